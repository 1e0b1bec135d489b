package agent_test

import (
	"reflect"
	"testing"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/spec"
)

// TestRecordVTPM: what a backend is asked carries the record's ids, spec,
// secret reference, domain and desired state, says manufactured once EKs
// are recorded and active only in phase active, and nothing else.
func TestRecordVTPM(t *testing.T) {
	r := &agent.Record{InstanceID: "i-1", Incarnation: "c1", Project: "p1", Host: "h1", Domain: "guest1",
		Spec: spec.Spec{Version: spec.V20, Model: spec.CRB}, Desired: agent.DesiredStopped, Phase: agent.PhaseProvisioning,
		Reason: "r", SecretID: "s1", Generation: 4}
	want := agent.VTPM{InstanceID: "i-1", Incarnation: "c1", Spec: r.Spec, SecretID: "s1", Domain: "guest1", Desired: agent.DesiredStopped}
	if got := r.VTPM(); !reflect.DeepEqual(got, want) {
		t.Fatalf("%+v, want %+v", got, want)
	}
	r.EKs, r.Phase = []agent.EK{{Kind: "rsa2048"}}, agent.PhaseActive
	want.Manufactured, want.Active = true, true
	if got := r.VTPM(); !reflect.DeepEqual(got, want) {
		t.Fatalf("manufactured and active: %+v, want %+v", got, want)
	}
	for _, p := range []agent.Phase{agent.PhasePending, agent.PhaseStopped, agent.PhaseError, agent.PhaseDeleting} {
		r.Phase = p
		if r.VTPM().Active {
			t.Errorf("phase %s reads active", p)
		}
	}
}
