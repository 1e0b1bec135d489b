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

// BenchmarkWatch is an agent's watch of a host of 10 or 1000 vTPMs: one
// vTPM updated, then what changed since the previous revision read; its
// cost should not grow with the host's vTPMs.
func BenchmarkWatch(b *testing.B) {
	for _, e := range engines {
		for _, n := range []int{10, 1000} {
			b.Run(fmt.Sprintf("%s/vtpms=%d", e.name, n), func(b *testing.B) {
				ctx := context.Background()
				s, _ := e.open(b)
				putHosts(b, s, "h1")
				ids := make([]string, n)
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
				w := watcher{b, s}
				since := w.watch("h1", 0).Revision
				b.ResetTimer()
				for i := range b.N {
					w.update(ids[i%n], PhaseActive)
					c := w.watch("h1", since)
					if c.Reset || len(c.VTPMs) != 1 {
						b.Fatalf("watch from %d: reset %v, %d records", since, c.Reset, len(c.VTPMs))
					}
					since = c.Revision
				}
			})
		}
	}
}
