package xen

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
)

func TestGroup(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for _, name := range []string{"Group0", "group1", "Group", "Group-1"} {
		if _, err := OpenGroup(dir, name, 2); err == nil {
			t.Errorf("group %q opened", name)
		}
	}
	g, err := OpenGroup(dir, "Group1", 2)
	if err != nil {
		t.Fatal(err)
	}
	a, err := g.Register(ctx, "vtpm-a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := g.Register(ctx, "vtpm-b")
	if err != nil || a == b {
		t.Fatalf("second UUID: %v %v", b, err)
	}
	if _, err := g.Register(ctx, "vtpm-c"); !errors.Is(err, ErrGroupFull) {
		t.Fatalf("registering beyond capacity: %v", err)
	}
	// The books survive a restart; a release frees a place.
	g, err = OpenGroup(dir, "Group1", 2)
	if err != nil {
		t.Fatal(err)
	}
	if ids, _ := g.Registered(ctx); len(ids) != 2 || ids[0] != (Registration{a, "vtpm-a"}) || ids[1] != (Registration{b, "vtpm-b"}) {
		t.Fatalf("after reopening: %v", ids)
	}
	if err := g.Release(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := g.Release(ctx, uuid.New()); err != nil {
		t.Fatalf("releasing an unknown UUID: %v", err)
	}
	if _, err := g.Register(ctx, "vtpm-c"); err != nil {
		t.Fatalf("registering after a release: %v", err)
	}
}

// The UUID service over real HTTP: 100 concurrent GET / give 100 distinct
// UUIDs, all registered; anything else is a JSON error.
func TestUUIDServer(t *testing.T) {
	ctx := context.Background()
	g, err := OpenGroup(t.TempDir(), "Group1", 100)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(UUIDServer(g, nil))
	defer srv.Close()

	var mu sync.Mutex
	seen := map[uuid.UUID]bool{}
	var wg sync.WaitGroup
	for range 100 {
		wg.Go(func() {
			resp, err := http.Get(srv.URL + "/")
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			var body struct{ UUID string }
			if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&body) != nil {
				t.Errorf("GET /: %d", resp.StatusCode)
				return
			}
			id, err := uuid.Parse(body.UUID)
			if err != nil {
				t.Errorf("uuid %q: %v", body.UUID, err)
				return
			}
			mu.Lock()
			seen[id] = true
			mu.Unlock()
		})
	}
	wg.Wait()
	registered, _ := g.Registered(ctx)
	if len(seen) != 100 || len(registered) != 100 {
		t.Fatalf("%d distinct UUIDs served, %d registered; want 100 and 100", len(seen), len(registered))
	}
	for _, r := range registered {
		if !seen[r.UUID] || r.Owner != UUIDServiceOwner {
			t.Fatalf("registered %+v was never served", r)
		}
	}

	for _, c := range []struct {
		method, path string
		status       int
		code         api.Code
	}{
		{"GET", "/", 507, api.CodeGroupFull}, // the group holds 100
		{"POST", "/", 405, api.CodeMethodNotAllowed},
		{"DELETE", "/", 405, api.CodeMethodNotAllowed},
		{"GET", "/uuid", 404, api.CodeNotFound},
	} {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, strings.NewReader(""))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e api.ErrorBody
		json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != c.status || e.Error.Code != c.code || e.Error.Message == "" || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: %d %+v, want %d %s", c.method, c.path, resp.StatusCode, e, c.status, c.code)
		}
	}
}
