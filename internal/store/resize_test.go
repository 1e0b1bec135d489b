package store

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// TestVTPMResize: a pending resize is written and read back whole, kept by
// an agent's observation, and cleared by an update without one.
func TestVTPMResize(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		putHosts(t, s, "h1")
		v := sample("i-1", "p1", "h1")
		from := v.Spec
		v.Spec = spec.Spec{Version: spec.V12, Model: spec.TIS, SecretSecurity: spec.HostMode}
		v.Resize = &Resize{Status: ResizeResized, Kind: spec.ResizeNewTPM, From: &from, To: &v.Spec,
			OldSecretID: "6b1c2f7e-2b1a-4a3b-8c9d-0e1f2a3b4c5d", OldEKs: v.EKs, RequestedAt: time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)}
		v.EKs = nil
		if err := s.Update(ctx, func(tx *Tx) error { return tx.CreateVTPM(v) }); err != nil {
			t.Fatal(err)
		}
		get := func() *VTPM {
			t.Helper()
			var got *VTPM
			if err := s.View(ctx, func(tx *Tx) (err error) { got, err = tx.GetVTPM("i-1"); return }); err != nil {
				t.Fatal(err)
			}
			return got
		}
		got := get()
		if !reflect.DeepEqual(got.Resize, v.Resize) {
			t.Fatalf("resize read back:\n got %+v\nwant %+v", got.Resize, v.Resize)
		}

		// An agent's observation writes its own columns only.
		o := Observation{InstanceID: "i-1", Incarnation: got.Incarnation, Generation: got.Generation, Host: "h1", Phase: PhaseActive}
		if err := s.Update(ctx, func(tx *Tx) error { _, _, _, err := tx.ObserveVTPM(o); return err }); err != nil {
			t.Fatal(err)
		}
		if got = get(); got.Phase != PhaseActive || !reflect.DeepEqual(got.Resize, v.Resize) {
			t.Fatalf("after an observation: phase %s, resize %+v", got.Phase, got.Resize)
		}

		got.Resize = nil
		if err := s.Update(ctx, func(tx *Tx) error { return tx.UpdateVTPM(got) }); err != nil {
			t.Fatal(err)
		}
		if got = get(); got.Resize != nil {
			t.Fatalf("resize after clearing: %+v", got.Resize)
		}
	})
}
