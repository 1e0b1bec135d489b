package server

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/store"
)

// clock is a test's time, moved by hand.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// host reads GET /v1/hosts/h1 and checks that the list says the same.
func (f *fixture) host(t *testing.T) api.Host {
	t.Helper()
	var h api.Host
	if code := f.call(t, "GET", "/v1/hosts/h1", "", nil, &h); code != 200 {
		t.Fatalf("GET /v1/hosts/h1: %d", code)
	}
	var list api.HostList
	if code := f.call(t, "GET", "/v1/hosts", "", nil, &list); code != 200 || len(list.Items) != 1 || list.Items[0].State != h.State ||
		!list.Items[0].LastHeartbeat.Equal(h.LastHeartbeat) || list.Items[0].Draining != h.Draining || list.Items[0].Version != h.Version {
		t.Fatalf("GET /v1/hosts: %d %+v; GET /v1/hosts/h1: %+v", code, list.Items, h)
	}
	return h
}

// place creates a vTPM for id and returns the status and error code.
func (f *fixture) place(t *testing.T, id string) (int, api.Error) {
	t.Helper()
	var e api.ErrorBody
	code := f.call(t, "POST", "/v1/vtpms", "", create(id, map[string]string{"hw:tpm_version": "2.0"}), &e)
	return code, e.Error
}

// TestHostHeartbeatsAndState: a host reads up while its agent's heartbeats
// arrive (registering is one), with its last heartbeat and version, and
// down once none came for longer than the window, by the server's clock
// (moved by hand here: nothing sleeps); a down host takes no new vTPM,
// keeps those it has, and is up again with its next heartbeat.
func TestHostHeartbeatsAndState(t *testing.T) {
	c := &clock{now: time.Date(2026, 3, 1, 9, 0, 0, 0, time.UTC)}
	f := newFixtureWith(t, setup{now: c.Now})
	recs := agentstore.New(f.store, f.keys, nil, nil)
	ctx := context.Background()
	if err := recs.RegisterHost(ctx, agent.Host{Name: "h1", Traits: f.traits(t), Capacity: 2, Backend: "swtpm", Version: "v1.4.0"}); err != nil {
		t.Fatal(err)
	}
	h := f.host(t)
	if h.State != "up" || h.Draining || !h.LastHeartbeat.Equal(c.Now()) || h.Version != "v1.4.0" || h.Capacity != 2 || h.Used != 0 || len(h.Traits) == 0 {
		t.Fatalf("registered: %+v", h)
	}
	if code, e := f.place(t, "44444444-0000-4000-8000-000000000001"); code != 202 {
		t.Fatalf("create on an up host: %d %+v", code, e)
	}

	c.advance(45 * time.Second)
	if err := recs.Heartbeat(ctx, agent.Heartbeat{Host: "h1", Version: "v1.5.0"}); err != nil {
		t.Fatal(err)
	}
	beat := c.Now()
	c.advance(60 * time.Second) // the window, not more
	if h := f.host(t); h.State != "up" || !h.LastHeartbeat.Equal(beat) || h.Version != "v1.5.0" || h.Used != 1 {
		t.Fatalf("a window after a heartbeat: %+v", h)
	}
	c.advance(time.Second)
	if h := f.host(t); h.State != "down" || !h.LastHeartbeat.Equal(beat) || h.Used != 1 {
		t.Fatalf("past the window: %+v", h)
	}
	code, e := f.place(t, "44444444-0000-4000-8000-000000000002")
	if code != 409 || e.Code != api.CodeNoValidHost || !strings.Contains(e.Message, "h1, is down") {
		t.Fatalf("create with the only host down: %d %+v", code, e)
	}
	var v api.VTPM
	if code := f.call(t, "GET", "/v1/vtpms/44444444-0000-4000-8000-000000000001", "", nil, &v); code != 200 || v.Host != "h1" || v.Desired != "running" {
		t.Fatalf("the down host's vTPM: %d %+v", code, v)
	}

	if err := recs.Heartbeat(ctx, agent.Heartbeat{Host: "h1", Version: "v1.5.0"}); err != nil {
		t.Fatal(err)
	}
	if h := f.host(t); h.State != "up" || !h.LastHeartbeat.Equal(c.Now()) {
		t.Fatalf("after the agent came back: %+v", h)
	}
	if code, e := f.place(t, "44444444-0000-4000-8000-000000000002"); code != 202 {
		t.Fatalf("create once the host is back: %d %+v", code, e)
	}
	if err := recs.Heartbeat(ctx, agent.Heartbeat{Host: "h9"}); !errors.Is(err, agent.ErrNotFound) {
		t.Fatalf("a heartbeat of a host never registered: %v, want agent.ErrNotFound", err)
	}
}

// traits are h1's traits as the fixture registered them.
func (f *fixture) traits(t *testing.T) []string {
	t.Helper()
	var h *store.Host
	if err := f.store.View(context.Background(), func(tx *store.Tx) (err error) { h, err = tx.GetHost("h1"); return err }); err != nil {
		t.Fatal(err)
	}
	return h.Traits
}

// TestDrain: the operator drains a host (no new vTPM is placed on it, and
// the refusal says why; those it has stay) and undrains it (placement
// works again); both are idempotent, and each change, only a change, is an
// event of the host naming the operator. A drained host whose agent goes
// away reads down, still drained, and draining when it is back. Only the
// operator may drain, a host that exists, with no body.
func TestDrain(t *testing.T) {
	c := &clock{now: time.Date(2026, 3, 1, 9, 0, 0, 0, time.UTC)}
	f := newFixtureWith(t, setup{now: c.Now})
	if code, e := f.place(t, "55555555-0000-4000-8000-000000000001"); code != 202 {
		t.Fatalf("create: %d %+v", code, e)
	}
	for range 2 {
		var h api.Host
		if code := f.call(t, "POST", "/v1/hosts/h1/drain", "", nil, &h); code != 200 || h.State != "draining" || !h.Draining || h.Used != 1 {
			t.Fatalf("drain: %d %+v", code, h)
		}
	}
	if h := f.host(t); h.State != "draining" || !h.Draining {
		t.Fatalf("drained: %+v", h)
	}
	code, e := f.place(t, "55555555-0000-4000-8000-000000000002")
	if code != 409 || e.Code != api.CodeNoValidHost || !strings.Contains(e.Message, "h1, is draining") {
		t.Fatalf("create with the only host draining: %d %+v", code, e)
	}
	var v api.VTPM
	if code := f.call(t, "GET", "/v1/vtpms/55555555-0000-4000-8000-000000000001", "", nil, &v); code != 200 || v.Desired != "running" {
		t.Fatalf("the drained host's vTPM: %d %+v", code, v)
	}

	c.advance(61 * time.Second)
	if h := f.host(t); h.State != "down" || !h.Draining {
		t.Fatalf("drained, its agent gone: %+v", h)
	}
	if err := agentstore.New(f.store, f.keys, nil, nil).Heartbeat(context.Background(), agent.Heartbeat{Host: "h1", Version: "v1"}); err != nil {
		t.Fatal(err)
	}
	if h := f.host(t); h.State != "draining" || !h.Draining {
		t.Fatalf("drained, its agent back: %+v", h)
	}
	for range 2 {
		var h api.Host
		if code := f.call(t, "POST", "/v1/hosts/h1/undrain", "", nil, &h); code != 200 || h.State != "up" || h.Draining {
			t.Fatalf("undrain: %d %+v", code, h)
		}
	}
	if code, e := f.place(t, "55555555-0000-4000-8000-000000000002"); code != 202 {
		t.Fatalf("create once undrained: %d %+v", code, e)
	}

	var evs []store.Event
	if err := f.store.View(context.Background(), func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(store.HostKey("h1"), ""); return err }); err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, ev := range evs {
		actions = append(actions, ev.Action)
		if !strings.HasPrefix(ev.Actor, "api:operator") {
			t.Errorf("event %q by %q, not the operator", ev.Action, ev.Actor)
		}
	}
	if strings.Join(actions, ",") != "drained,undrained" {
		t.Fatalf("the host's events: %q, want one drained and one undrained", actions)
	}

	for _, c := range []struct {
		path, project, body string
		status              int
		code                api.Code
	}{
		{"/v1/hosts/h9/drain", "", "", 404, api.CodeNotFound},
		{"/v1/hosts/h9/undrain", "", "", 404, api.CodeNotFound},
		{"/v1/hosts/h1/drain", "p1", "", 403, api.CodeForbidden},
		{"/v1/hosts/h1/undrain", "p1", "", 403, api.CodeForbidden},
		{"/v1/hosts/h1/drain", "", `{"draining": true}`, 400, api.CodeInvalidJSON},
	} {
		var e api.ErrorBody
		var body any
		if c.body != "" {
			body = c.body
		}
		if status := f.call(t, "POST", c.path, c.project, body, &e); status != c.status || e.Error.Code != c.code {
			t.Errorf("POST %s as %q: %d %+v; want %d %s", c.path, c.project, status, e.Error, c.status, c.code)
		}
	}
	if code := f.call(t, "GET", "/v1/hosts/h9", "", nil, nil); code != 404 {
		t.Errorf("GET an unknown host: %d", code)
	}
	if code := f.call(t, "GET", "/v1/hosts", "p1", nil, nil); code != 403 {
		t.Errorf("a project listing hosts: %d", code)
	}
	if h := f.host(t); h.Draining {
		t.Fatalf("refused requests drained the host: %+v", h)
	}
}
