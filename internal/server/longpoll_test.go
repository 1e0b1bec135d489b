package server

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
)

// watched is one answer to a conditional GET of a vTPM.
type watched struct {
	code int
	tag  string
	v    api.VTPM
	took time.Duration
}

// watch GETs inst as project, naming the version tag (if any) and waiting
// up to wait (if any) for it to change.
func (f *fixture) watch(t *testing.T, project, tag, wait string) watched {
	t.Helper()
	path := "/v1/vtpms/" + inst
	if wait != "" {
		path += "?wait=" + wait
	}
	req, _ := http.NewRequest("GET", f.url+path, nil)
	if project != "" {
		req.Header.Set(api.ProjectHeader, project)
	}
	if tag != "" {
		req.Header.Set("If-None-Match", tag)
	}
	start := time.Now()
	resp, err := f.http.Do(req)
	if err != nil {
		t.Error(err)
		return watched{}
	}
	defer resp.Body.Close()
	w := watched{code: resp.StatusCode, tag: resp.Header.Get("ETag"), took: time.Since(start)}
	body, _ := io.ReadAll(resp.Body)
	if w.code == 200 {
		if err := json.Unmarshal(body, &w.v); err != nil {
			t.Errorf("decoding %q: %v", body, err)
		}
	}
	return w
}

// TestWatchVTPM: a client waits for a vTPM to change with If-None-Match
// and ?wait=, and the server answers when it does, not by polling.
func TestWatchVTPM(t *testing.T) {
	f := newFixture(t)
	f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil)
	first := f.watch(t, "", "", "")
	if first.code != 200 || first.tag == "" || first.v.Phase != "pending" {
		t.Fatalf("plain GET: %+v", first)
	}
	if w := f.watch(t, "", first.tag, ""); w.code != 304 || w.tag != first.tag {
		t.Fatalf("conditional GET of an unchanged vTPM: %+v", w)
	}
	if w := f.watch(t, "", first.tag, "200ms"); w.code != 304 || w.took < 200*time.Millisecond {
		t.Fatalf("a wait with no change: %+v", w)
	}
	if w := f.watch(t, "", `"stale", `+first.tag, "1ms"); w.code != 304 {
		t.Fatalf("If-None-Match with a list: %+v", w)
	}
	if w := f.watch(t, "", `"another version"`, "1m"); w.code != 200 || w.tag != first.tag {
		t.Fatalf("a client with another version did not get this one at once: %+v", w)
	}
	for _, bad := range []string{"soon", "-1s", "6m"} {
		var e api.ErrorBody
		if code := f.call(t, "GET", "/v1/vtpms/"+inst+"?wait="+bad, "", nil, &e); code != 400 || e.Error.Code != api.CodeInvalidParameter {
			t.Errorf("wait=%s: %d %+v", bad, code, e)
		}
	}
	if w := f.watch(t, "p2", first.tag, "50ms"); w.code != 404 {
		t.Fatalf("another project's watch: %+v", w)
	}

	// A change answers a waiting client with the new version.
	got := make(chan watched)
	go func() { got <- f.watch(t, "", first.tag, "1m") }()
	time.Sleep(100 * time.Millisecond)
	f.call(t, "POST", "/v1/vtpms/"+inst+"/stop", "", nil, nil)
	stopped := <-got
	if stopped.code != 200 || stopped.v.Desired != "stopped" || stopped.tag == first.tag {
		t.Fatalf("after stop: %+v", stopped)
	}

	// So does a change committed by another process sharing the database,
	// which this server hears of only by reading again.
	go func() { got <- f.watch(t, "", stopped.tag, "1m") }()
	time.Sleep(100 * time.Millisecond)
	other := f.reopen()
	err := other.Update(context.Background(), func(tx *store.Tx) error {
		v, err := tx.GetVTPM(inst)
		if err != nil {
			return err
		}
		v.Phase = store.PhaseStopped
		return tx.UpdateVTPM(v)
	})
	if err != nil {
		t.Fatal(err)
	}
	foreign := <-got
	if foreign.code != 200 || foreign.v.Phase != "stopped" {
		t.Fatalf("after another process's change: %+v", foreign)
	}

	// A vTPM deleted while a client waits ends the wait with 404, and one
	// made again under the same instance id is another version.
	var deleting api.VTPM
	f.call(t, "DELETE", "/v1/vtpms/"+inst, "", nil, &deleting)
	go func() { got <- f.watch(t, "", f.watch(t, "", "", "").tag, "1m") }()
	time.Sleep(100 * time.Millisecond)
	err = f.store.Update(context.Background(), func(tx *store.Tx) error { return tx.DeleteVTPM(inst) })
	if err != nil {
		t.Fatal(err)
	}
	if w := <-got; w.code != 404 {
		t.Fatalf("after the agent deleted it: %+v", w)
	}
	f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), nil)
	if w := f.watch(t, "", first.tag, ""); w.code != 200 || w.tag == first.tag {
		t.Fatalf("the same instance id made again: %+v (first %s)", w, first.tag)
	}

	// Long polls are counted, but not timed with the other requests.
	resp, err := f.http.Get(f.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`vtpmd_http_requests_total{code="304",route="GET /v1/vtpms/{id}"} 3`,
		`vtpmd_http_request_duration_seconds_count{route="GET /v1/vtpms/{id}"} 4`, // the GETs without ?wait=,
	} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	// Shutting down answers every long poll, now and later.
	go func() { got <- f.watch(t, "", f.watch(t, "", "", "").tag, "1m") }()
	time.Sleep(100 * time.Millisecond)
	f.api.EndLongPolls()
	if w := <-got; w.code != 304 {
		t.Fatalf("a long poll at shutdown: %+v", w)
	}
	if w := f.watch(t, "", f.watch(t, "", "", "").tag, "1m"); w.code != 304 {
		t.Fatalf("a long poll after shutdown: %+v", w)
	}
}
