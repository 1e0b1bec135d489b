package store

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkUpdateVTPM is one agent step: read a vTPM, change its phase,
// write it back with an event, in one transaction; on each engine.
func BenchmarkUpdateVTPM(b *testing.B) {
	for _, e := range engines {
		b.Run(e.name, func(b *testing.B) {
			ctx := context.Background()
			s, _ := e.open(b)
			putHosts(b, s, "h1")
			ids := make([]string, 100)
			err := s.Update(ctx, func(tx *Tx) error {
				for i := range ids {
					ids[i] = fmt.Sprintf("i-%d", i)
					if err := tx.CreateVTPM(sample(ids[i], "p", "h1")); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for n := range b.N {
				err := s.Update(ctx, func(tx *Tx) error {
					v, err := tx.GetVTPM(ids[n%len(ids)])
					if err != nil {
						return err
					}
					v.Phase = PhaseActive
					if n%2 == 1 {
						v.Phase = PhaseStopped
					}
					if err := tx.UpdateVTPM(v); err != nil {
						return err
					}
					return tx.AppendEvent(Event{Actor: "agent:h1", InstanceID: v.InstanceID, Action: string(v.Phase)})
				})
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
