package server

import (
	"context"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
)

// TestVTPMViewIsTheRecord: the API shows a vTPM's sockets as its host's
// agent recorded them (here through agent.Records, as an agent in any
// process does), with no backend to ask: none until the agent reports
// them, then on every read (one, a page), and none again once
// the agent records the vTPM stopped.
func TestVTPMViewIsTheRecord(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	var v api.VTPM
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0"}), &v); code != 202 || v.Sockets != nil {
		t.Fatalf("create: %d, sockets %+v", code, v.Sockets)
	}

	recs := agentstore.New(f.store, f.keys, nil, nil)
	observe := func(phase agent.Phase, sockets api.Sockets, action string) {
		t.Helper()
		r, err := recs.Get(ctx, inst)
		if err != nil {
			t.Fatal(err)
		}
		r.Phase, r.Sockets = phase, sockets
		if len(r.EKs) == 0 {
			r.EKs = []agent.EK{{Kind: "rsa2048", Handle: 0x81010001, PublicDER: []byte{1}}}
		}
		if err := recs.Update(ctx, r, agent.Event{Actor: "agent:h1", Action: action}); err != nil {
			t.Fatal(err)
		}
	}
	want := api.Sockets{Data: "/run/vtpmd/" + inst + "/tpm.sock", Ctrl: "/run/vtpmd/" + inst + "/tpm.sock.ctrl"}
	observe(agent.PhaseActive, want, "manufactured and started")

	var got api.VTPM
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &got); code != 200 || got.Phase != "active" || got.Sockets == nil || *got.Sockets != want {
		t.Fatalf("get: %d, phase %s, sockets %+v; want %+v", code, got.Phase, got.Sockets, want)
	}
	var list api.VTPMList
	if f.call(t, "GET", "/v1/vtpms", "", nil, &list); len(list.Items) != 1 || list.Items[0].Sockets == nil || *list.Items[0].Sockets != want {
		t.Fatalf("list: %+v", list.Items)
	}
	observe(agent.PhaseStopped, api.Sockets{}, "stopped")
	var stopped api.VTPM
	if code := f.call(t, "GET", "/v1/vtpms/"+inst, "", nil, &stopped); code != 200 || stopped.Phase != "stopped" || stopped.Sockets != nil {
		t.Fatalf("after the agent recorded it stopped: %d, phase %s, sockets %+v", code, stopped.Phase, stopped.Sockets)
	}
}
