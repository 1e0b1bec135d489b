package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestXenUUIDServer runs `vtpmd xen-uuid-server` as a process: it serves
// registered UUIDs from its group's books until the group is full, keeps
// them across a restart, and refuses Group0.
func TestXenUUIDServer(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "vtpmd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	books := filepath.Join(dir, "books")
	serve := func() (addr string, stop func()) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = ln.Addr().String()
		ln.Close()
		cmd := exec.Command(bin, "xen-uuid-server", "--listen", addr, "--data-dir", books, "--capacity", "2")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the UUID service did not listen")
			}
		}
		return addr, func() { cmd.Process.Kill(); cmd.Wait() }
	}
	get := func(addr string) (int, string) {
		resp, err := http.Get("http://" + addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, fmt.Sprint(body)
	}

	addr, stop := serve()
	first, firstBody := get(addr)
	stop()
	addr, stop = serve() // the books survive a restart: one place is left
	defer stop()
	second, _ := get(addr)
	full, fullBody := get(addr)
	if first != 200 || !strings.Contains(firstBody, "uuid:") || second != 200 || full != 507 || !strings.Contains(fullBody, "group_full") {
		t.Fatalf("GET / three times: %d %s, %d, %d %s", first, firstBody, second, full, fullBody)
	}
	out, err := exec.Command(bin, "xen-uuid-server", "--listen", "127.0.0.1:0", "--data-dir", books, "--group", "Group0").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Group0 is special") {
		t.Fatalf("Group0: %v %s", err, out)
	}
}
