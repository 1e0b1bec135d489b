package daemon

import (
	"context"
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/accessibility"
	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/attestor"
	"github.com/vtpmd/vtpmd/internal/citest"
)

var screenshots = flag.String("screenshots", "", "write the web console test's screenshots to this directory (docs/console updates the README's)")

// browser starts a headless Chromium (Debian's chromium package, which
// make test installs) for the test, with a laptop's window.
func browser(t *testing.T) context.Context {
	t.Helper()
	path, err := exec.LookPath("chromium")
	if err != nil {
		citest.Missing(t, "chromium is not on PATH (Debian package chromium)")
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(path), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.WindowSize(1366, 900), chromedp.Flag("disable-dev-shm-usage", true), chromedp.Flag("force-color-profile", "srgb"))
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(alloc)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	if err := chromedp.Do(ctx); err != nil { // starts the browser
		t.Fatalf("starting chromium: %v", err)
	}
	return ctx
}

// step runs browser actions, failing the test with what was being done.
func step(t *testing.T, ctx context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// value runs one browser action that returns a value.
func value[T any](t *testing.T, ctx context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return v
}

// until waits for the page's JavaScript expression to be true, across
// navigations (which end a poll inside the page). Each poll has its own
// deadline: an evaluation sent to a document that a navigation is
// replacing (a sign-in's redirects, a click's form post) may never be
// answered, and a poll without one waited for it for good.
func until(t *testing.T, ctx context.Context, what, expr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		poll, cancel := context.WithTimeout(ctx, 2*time.Second)
		ok, err := chromedp.Run(poll, chromedp.Evaluate[bool](expr))
		cancel()
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			poll, cancel := context.WithTimeout(ctx, 2*time.Second)
			where, _ := chromedp.Run(poll, chromedp.Evaluate[string](`location.href + " " + document.title`))
			cancel()
			t.Fatalf("%s: %s is not true after 30s (%v), at %s", what, expr, err, where)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// screenshot takes the page as a PNG, kept in -screenshots when given.
func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	png := value(t, ctx, "screenshot "+name, chromedp.FullScreenshot(100))
	if len(png) < 1000 {
		t.Fatalf("screenshot %s: %d bytes", name, len(png))
	}
	if *screenshots != "" {
		if err := os.WriteFile(filepath.Join(*screenshots, name), png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// signIn opens a sign-in link and presses its button.
func signIn(t *testing.T, ctx context.Context, link api.ConsoleLink) {
	t.Helper()
	step(t, ctx, "signing in", chromedp.Navigate(link.URL), chromedp.Click(chromedp.CSS("form.signin button")))
	until(t, ctx, "signed in", `location.pathname !== "/ui/login" && document.querySelector("header nav") !== null`)
}

// formControls are the accessibility roles of form controls.
var formControls = map[string]bool{"textbox": true, "searchbox": true, "combobox": true, "listbox": true, "button": true,
	"checkbox": true, "radio": true, "spinbutton": true, "slider": true, "switch": true}

// labelled checks that every form control of the open page has an
// accessible name, as Chromium's accessibility tree computes it (from its
// label, aria-label or aria-labelledby, a button's text), and that the
// tree has as many controls as the page's DOM.
func labelled(t *testing.T, ctx context.Context, page string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	tree, err := chromedp.Call(ctx, accessibility.GetFullAXTree, accessibility.GetFullAXTreeParams{})
	if err != nil {
		t.Fatalf("%s: the accessibility tree: %v", page, err)
	}
	controls := 0
	for _, n := range tree.Nodes {
		var role, name string
		if n.Ignored || n.Role == nil || json.Unmarshal(n.Role.Value, &role) != nil || !formControls[role] {
			continue
		}
		controls++
		if n.Name != nil {
			json.Unmarshal(n.Name.Value, &name)
		}
		if strings.TrimSpace(name) == "" {
			t.Errorf("%s: a %s without an accessible name (DOM node %d)", page, role, n.BackendDOMNodeID)
		}
	}
	inDOM := value(t, ctx, page+": its controls", chromedp.Evaluate[int](`document.querySelectorAll("input:not([type=hidden]), select, textarea, button").length`))
	if controls != inDOM || controls == 0 {
		t.Fatalf("%s: %d form controls in the accessibility tree, %d in the page", page, controls, inDOM)
	}
}

// tabStops presses Tab n times from the top of the freshly loaded page
// and says where each press put the focus: "skip" (the skip link),
// "nav:Fleet" (a section's link), "sort:Host" (a column's sort link),
// else the element's tag and text or name.
func tabStops(t *testing.T, ctx context.Context, n int) []string {
	t.Helper()
	var out []string
	for range n {
		step(t, ctx, "pressing Tab", chromedp.KeyEvent(kb.Tab))
		out = append(out, value(t, ctx, "the focused element", chromedp.Evaluate[string](`(e =>
			e.matches("a.skip") ? "skip" :
			e.closest("header nav") ? "nav:" + e.textContent :
			e.closest("thead") ? "sort:" + e.textContent.replace(/ [▲▼]$/, "") :
			e.tagName.toLowerCase() + ":" + (e.name || e.textContent.trim()))(document.activeElement)`)))
	}
	return out
}

// bootLog is a boot's event log as firmware and GRUB write it: the
// kernel's command line goes into PCR 8.
func bootLog(cmdline string) []byte {
	log, _ := attesttest.EventLog([]attesttest.Measurement{
		{PCR: 0, Type: 0x08, Data: []byte("OVMF 2026.11")},
		{PCR: 4, Type: 0x80000007, Data: []byte("Calling EFI Application from Boot Option")},
		{PCR: 8, Type: 0x0d, Data: []byte("grub_cmd: linux /vmlinuz root=/dev/vda1")},
		{PCR: 8, Type: 0x0d, Data: []byte("kernel_cmdline: " + cmdline)},
		{PCR: 9, Type: 0x0d, Data: []byte("/boot/vmlinuz-6.12")},
	})
	return log
}

// TestConsoleInBrowser drives the web console in a real headless
// Chromium against a real all-in-one vtpmd with real vTPMs: the operator
// signs in and sees the fleet's host; a tenant sees only its project's
// instances and gets not found for another's; a tenant's open instance
// page shows, without a reload, the instance turning untrusted after a
// boot with another kernel command line (a real quote of the vTPM's
// swtpm, judged by the verifier), naming PCR 8 and the event that
// differs, both versions side by side; that command line holds a
// <script>, which shows as text and never runs.
func TestConsoleInBrowser(t *testing.T) {
	ctx := browser(t)
	dir := t.TempDir()
	u := startConfigured(t, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "test-host"})
	bg := context.Background()

	// p1's instance boots, attests and is judged trusted by the policy
	// learned from that boot; p2 has one too, and p1 two more.
	id := "0a0a0a0a-0000-4000-8000-00000000c051"
	v := u.create(t, id, "2.0")
	for _, more := range []string{"0a0a0a0a-0000-4000-8000-00000000c052", "0a0a0a0a-0000-4000-8000-00000000c053"} {
		u.create(t, more, "2.0")
	}
	theirs := "0b0b0b0b-0000-4000-8000-00000000c054"
	if _, err := u.c.Create(bg, api.CreateVTPMRequest{InstanceID: theirs, Project: "p2",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}); err != nil {
		t.Fatal(err)
	}
	u.wait(t, theirs, "active")
	logPath := filepath.Join(dir, "binary_bios_measurements")
	good := bootLog("root=/dev/vda1 ro quiet")
	os.WriteFile(logPath, good, 0o644)
	tpm := dialTPM(t, v.Sockets.Data)
	boot(t, tpm, good)
	agent := &attestor.Agent{TPM: tpm, API: u.agents, Subject: client.Instance(id), EventLog: logPath}
	if err := agent.Register(bg); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.Attest(bg); err != nil {
		t.Fatal(err)
	}
	if _, err := u.c.CreatePolicy(bg, api.CreatePolicyRequest{Name: "web-boot", Project: "p1", LearnFrom: &api.LearnFrom{InstanceID: id}}); err != nil {
		t.Fatal(err)
	}
	if a, err := u.c.SetPolicy(bg, client.Instance(id), api.PolicyRequest{Policy: "web-boot"}); err != nil || a.Verdict != "trusted" {
		t.Fatalf("applying the policy: %+v %v", a, err)
	}

	// The operator: the fleet lists the host; instances and policies.
	link, err := u.c.ConsoleLink(bg, "")
	if err != nil {
		t.Fatal(err)
	}
	signIn(t, ctx, link)
	if loc := value(t, ctx, "location", chromedp.Location()); !strings.HasSuffix(loc, "/ui/fleet") {
		t.Fatalf("the operator lands on %s", loc)
	}
	hosts := value(t, ctx, "the hosts table", chromedp.Text(chromedp.CSS("#hosts + .scroll table")))
	if !strings.Contains(hosts, "test-host") || !strings.Contains(hosts, "up") {
		t.Fatalf("the fleet's hosts:\n%s", hosts)
	}
	screenshot(t, ctx, "fleet.png")
	labelled(t, ctx, "the fleet page")
	step(t, ctx, "the instances page", chromedp.Navigate(u.d.URL+"/ui/instances"), chromedp.WaitVisible(chromedp.CSS("table.instances")))
	if rows := value(t, ctx, "instances", chromedp.Text(chromedp.CSS("table.instances tbody"))); !strings.Contains(rows, theirs) || !strings.Contains(rows, id) {
		t.Fatalf("the operator's instances:\n%s", rows)
	}
	screenshot(t, ctx, "instances.png")

	// The keyboard: from the top of the page, Tab reaches the skip link
	// first, then the sections, then (past the filter form) every sort
	// link; the skip link takes the focus to the content; a live update
	// keeps the focus where it was. Every form control has a name.
	labelled(t, ctx, "the instances page")
	stops := tabStops(t, ctx, 24)
	if !slices.Equal(stops[:4], []string{"skip", "nav:Fleet", "nav:Instances", "nav:Policies"}) {
		t.Fatalf("the first Tab stops: %q", stops)
	}
	var sorts []string
	for _, s := range stops {
		if label, ok := strings.CutPrefix(s, "sort:"); ok {
			sorts = append(sorts, label)
		}
	}
	if want := []string{"Instance", "Project", "Phase", "TPM", "Host", "Verdict", "Policy", "Last evidence"}; !slices.Equal(sorts, want) {
		t.Fatalf("Tab reaches the sort links %q, not %q: %q", sorts, want, stops)
	}
	step(t, ctx, "the instances page again", chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("table.instances")))
	tabStops(t, ctx, 1)
	step(t, ctx, "following the skip link", chromedp.KeyEvent(kb.Enter))
	until(t, ctx, "the focus on the content", `document.activeElement === document.getElementById("main")`)
	for range 16 {
		step(t, ctx, "pressing Tab", chromedp.KeyEvent(kb.Tab))
		if value(t, ctx, "the focused element", chromedp.Evaluate[bool](`document.activeElement.closest("thead") !== null`)) {
			break
		}
	}
	focused := value(t, ctx, "the focused sort link", chromedp.Evaluate[string](`document.activeElement.closest("thead") ? document.activeElement.textContent : ""`))
	refreshed := value(t, ctx, "the last refresh", chromedp.Evaluate[string](`document.body.dataset.refreshed || ""`))
	if _, err := u.c.Create(bg, api.CreateVTPMRequest{InstanceID: "0b0b0b0b-0000-4000-8000-00000000c055", Project: "p2",
		ResolveRequest: api.ResolveRequest{FlavorSpecs: map[string]string{"hw:tpm_version": "2.0"}}}); err != nil {
		t.Fatal(err)
	}
	until(t, ctx, "a live update", `(document.body.dataset.refreshed || "") !== `+strconv.Quote(refreshed)+` && document.body.textContent.includes("00000000c055")`)
	if after := value(t, ctx, "the focus after the update", chromedp.Evaluate[string](`document.activeElement.closest("#live thead") ? document.activeElement.textContent : document.activeElement.tagName`)); focused == "" || after != focused {
		t.Fatalf("the focus on the sort link %q is on %q after a live update", focused, after)
	}
	step(t, ctx, "the policies page", chromedp.Navigate(u.d.URL+"/ui/policies"), chromedp.WaitVisible(chromedp.CSS("main table")))
	if ps := value(t, ctx, "policies", chromedp.Text(chromedp.CSS("main tbody"))); !strings.Contains(ps, "web-boot") || !strings.Contains(ps, "1 instance") {
		t.Fatalf("the policies:\n%s", ps)
	}
	screenshot(t, ctx, "policies.png")
	labelled(t, ctx, "the policies page")
	step(t, ctx, "signing out", chromedp.Click(chromedp.CSS(".who button")))
	until(t, ctx, "signed out to the sign-in page", `location.pathname === "/ui/login" && document.querySelector("header nav") === null`)

	// Tenant p1: its instances alone; p2's instance is not found.
	link, err = u.c.ConsoleLink(bg, "p1")
	if err != nil {
		t.Fatal(err)
	}
	step(t, ctx, "the sign-in page", chromedp.Navigate(link.URL), chromedp.WaitVisible(chromedp.CSS("form.signin button")))
	labelled(t, ctx, "the sign-in page")
	signIn(t, ctx, link)
	rows := value(t, ctx, "p1's instances", chromedp.Text(chromedp.CSS("table.instances tbody")))
	if !strings.Contains(rows, id) || strings.Contains(rows, theirs) {
		t.Fatalf("p1's instances:\n%s", rows)
	}
	step(t, ctx, "p2's instance page", chromedp.Navigate(u.d.URL+"/ui/instances/"+theirs), chromedp.WaitVisible(chromedp.CSS("main h1")))
	if h1 := value(t, ctx, "the heading", chromedp.Text(chromedp.CSS("main h1"))); h1 != "Not Found" {
		t.Fatalf("p1 on p2's instance page: %q", h1)
	}

	// p1's instance page, open; a mark that a reload would wipe.
	step(t, ctx, "p1's instance page", chromedp.Navigate(u.d.URL+"/ui/instances/"+id), chromedp.WaitVisible(chromedp.CSS("#pcrs")))
	until(t, ctx, "the live stream open", `document.getElementById("live-status").textContent === "Live"`)
	value(t, ctx, "marking the page", chromedp.Evaluate[bool](`window.notReloaded = true`))
	if summary := value(t, ctx, "summary", chromedp.Text(chromedp.CSS("#overall-summary"))); strings.HasPrefix(summary, "the VM is untrusted") {
		t.Fatalf("untrusted before the other boot: %s", summary)
	}

	// The guest reboots with another kernel command line.
	if _, err := u.c.Stop(bg, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "stopped")
	if _, err := u.c.Start(bg, id); err != nil {
		t.Fatal(err)
	}
	u.wait(t, id, "active")
	evil := bootLog(`root=/dev/vda1 init=/bin/sh <script>window.pwned=1</script>`)
	os.WriteFile(logPath, evil, 0o644)
	tpm = dialTPM(t, v.Sockets.Data)
	boot(t, tpm, evil)
	agent = &attestor.Agent{TPM: tpm, API: u.agents, Subject: client.Instance(id), EventLog: logPath}
	if err := agent.Register(bg); err != nil {
		t.Fatal(err)
	}
	judged := time.Now()
	if a, err := agent.Attest(bg); err != nil || a.Verdict != "untrusted" {
		t.Fatalf("the other boot: %+v %v", a, err)
	}
	until(t, ctx, "the open page turning untrusted", `document.getElementById("overall-summary").textContent.startsWith("the VM is untrusted")`)
	t.Logf("the open page showed the verdict %v after the evidence was sent (the judgement included)", time.Since(judged).Round(time.Millisecond))
	if !value(t, ctx, "the mark", chromedp.Evaluate[bool](`window.notReloaded === true`)) {
		t.Fatal("the page was reloaded")
	}
	// Read at once: a later change may swap the live region meanwhile.
	pcrs := value(t, ctx, "the PCR rows", chromedp.Evaluate[map[string]string](`Object.fromEntries(
		["#pcr-0", "#pcr-4", "#pcr-8", "#pcr-8 + tr.diff", "#pcr-9"].map(s => [s, document.querySelector(s).textContent]))`))
	pcr8, diff := pcrs["#pcr-8"], pcrs["#pcr-8 + tr.diff"]
	if !strings.Contains(pcr8, "differs") || !strings.Contains(diff, "EV_IPL") || !strings.Contains(diff, "kernel_cmdline: root=/dev/vda1 ro quiet") ||
		!strings.Contains(diff, "kernel_cmdline: root=/dev/vda1 init=/bin/sh <script>window.pwned=1</script>") {
		t.Fatalf("PCR 8:\n%s\nfirst differing event:\n%s", pcr8, diff)
	}
	for _, other := range []string{"#pcr-0", "#pcr-4", "#pcr-9"} {
		if !strings.Contains(pcrs[other], "matches") {
			t.Fatalf("%s: %s", other, pcrs[other])
		}
	}
	if value(t, ctx, "the script", chromedp.Evaluate[bool](`window.pwned === 1 || document.querySelectorAll("#live script").length > 0`)) {
		t.Fatal("the event log's <script> ran, or is an element")
	}
	screenshot(t, ctx, "instance.png")
	labelled(t, ctx, "the instance page")

	// The policy's page, from the instance's: the instances that use it.
	step(t, ctx, "the policy's page", chromedp.Click(chromedp.CSS(`#live a[href^="/ui/policies/"]`)))
	until(t, ctx, "the policy's page", `document.querySelector("main h1").textContent === "Policy web-boot" && document.querySelector("ul.users") !== null`)
	if users := value(t, ctx, "the policy's users", chromedp.Text(chromedp.CSS("ul.users"))); !strings.Contains(users, id) {
		t.Fatalf("web-boot's instances: %s", users)
	}
}
