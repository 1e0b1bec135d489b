package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/store"
)

// TestSweepAbandonedTransfers: a running server removes the requests to
// hosts' agents that no server awaits any more (asked longer ago than
// twice the longest a server waits for one, an hour by default: here, two
// a move cut short left two hours ago, one answered by its agent and never
// collected, one whose host never came back), with a "transfer swept"
// event of the vTPM each and the metric vtpmd_state_transfers_swept_total;
// a request asked now stays.
func TestSweepAbandonedTransfers(t *testing.T) {
	defer func(every time.Duration) { reclaimInterval = every }(reclaimInterval)
	reclaimInterval = 20 * time.Millisecond
	ctx := context.Background()
	dir := t.TempDir()
	s, err := StartServer(ctx, Config{DataDir: dir, Listen: "127.0.0.1:0", HostName: "control"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Shutdown(ctx)
	past, err := store.Open(ctx, filepath.Join(dir, "vtpmd.db"), store.Options{Now: func() time.Time { return time.Now().Add(-2 * time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	defer past.Close()
	const id = "0a0a0a0a-0000-4000-8000-0000000000f1"
	var export, receive, fresh store.Transfer
	err = past.Update(ctx, func(tx *store.Tx) error {
		export = store.Transfer{Host: "h1", InstanceID: id, Incarnation: "a", Kind: store.TransferExport, Generation: 2}
		receive = store.Transfer{Host: "h2", InstanceID: id, Incarnation: "a", Kind: store.TransferReceive, Generation: 2, Bundle: []byte("bundle")}
		if err := tx.AskTransfer(&export); err != nil {
			return err
		}
		if err := tx.AskTransfer(&receive); err != nil {
			return err
		}
		return tx.AnswerTransfer("h1", export.ID, []byte("exported"), "", "")
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.store.Update(ctx, func(tx *store.Tx) error {
		fresh = store.Transfer{Host: "h2", InstanceID: id, Incarnation: "a", Kind: store.TransferReceive, Generation: 3, Bundle: []byte("bundle")}
		return tx.AskTransfer(&fresh)
	})
	if err != nil {
		t.Fatal(err)
	}

	gone := func(x store.Transfer) bool {
		err := s.store.View(ctx, func(tx *store.Tx) error { _, err := tx.GetTransfer(x.Host, x.ID); return err })
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			t.Fatal(err)
		}
		return err != nil
	}
	// The counter moves once the sweep's transaction committed.
	for deadline := time.Now().Add(time.Minute); !gone(export) || !gone(receive) || metric(t, s, "vtpmd_state_transfers_swept_total") != "2"; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after a minute: export gone %v, receive gone %v, vtpmd_state_transfers_swept_total %s",
				gone(export), gone(receive), metric(t, s, "vtpmd_state_transfers_swept_total"))
		}
	}
	if gone(fresh) {
		t.Fatal("the sweep removed a transfer asked just now")
	}
	var events []store.Event
	if err := s.store.View(ctx, func(tx *store.Tx) (err error) { events, err = tx.ListAllEvents(id); return err }); err != nil {
		t.Fatal(err)
	}
	details := map[string]bool{}
	for _, e := range events {
		if e.Action == "transfer swept" {
			details[e.Detail[:strings.Index(e.Detail, " asked at")]] = true
		}
	}
	if len(details) != 2 || !details["a export request to host h1"] || !details["a receive request to host h2"] {
		t.Fatalf("the sweep's events: %+v", events)
	}
}

// metric reads the value of the metric name (without labels) from s's
// /metrics, over the operator's socket.
func metric(t *testing.T, s *Server, name string) string {
	t.Helper()
	sock := strings.TrimPrefix(s.OperatorURL, "unix://")
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := c.Get("http://operator/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/metrics: %d %v", resp.StatusCode, err)
	}
	for line := range strings.SplitSeq(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	t.Fatalf("/metrics has no %s", name)
	return ""
}
