package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

// Join tokens are taken once; revocation marks every certificate of the
// host and leaves other hosts' alone; an added host has no heartbeat.
func TestJoinTokensAndHostCertificates(t *testing.T) {
	onEngines(t, func(t *testing.T, open func(testing.TB) (*Store, func() (*Store, error))) {
		ctx := context.Background()
		s, _ := open(t)
		exp := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
		err := s.Update(ctx, func(tx *Tx) error {
			if added, err := tx.AddHost("h1"); err != nil || !added {
				t.Fatalf("add h1: %v %v", added, err)
			}
			if added, err := tx.AddHost("h1"); err != nil || added {
				t.Fatalf("add h1 again: %v %v", added, err)
			}
			for _, tok := range []struct{ hash, host string }{{"aa", "h1"}, {"bb", "h1"}, {"cc", "h2"}} {
				if err := tx.PutJoinToken(tok.hash, tok.host, exp); err != nil {
					return err
				}
			}
			for _, c := range []HostCertificate{{Serial: "01", Host: "h1", NotAfter: exp}, {Serial: "02", Host: "h1", NotAfter: exp},
				{Serial: "03", Host: "h2", NotAfter: exp}, {Serial: "04", Host: "h1", NotAfter: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)}} {
				if err := tx.PutHostCertificate(c); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		err = s.Update(ctx, func(tx *Tx) error {
			h, err := tx.GetHost("h1")
			if err != nil || !h.HeartbeatAt.IsZero() || h.Capacity != 0 || len(h.Traits) != 0 {
				t.Fatalf("an added host: %+v %v", h, err)
			}
			if host, e, err := tx.TakeJoinToken("aa"); err != nil || host != "h1" || !e.Equal(exp) {
				t.Fatalf("take aa: %q %v %v", host, e, err)
			}
			if _, _, err := tx.TakeJoinToken("aa"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("take aa again: %v", err)
			}
			if n, err := tx.RevokeHostCertificates("h1"); err != nil || n != 3 {
				t.Fatalf("revoke h1: %d %v", n, err)
			}
			if n, err := tx.RevokeHostCertificates("h1"); err != nil || n != 0 {
				t.Fatalf("revoke h1 again: %d %v", n, err)
			}
			if n, err := tx.DeleteJoinTokens("h1"); err != nil || n != 1 {
				t.Fatalf("delete h1's tokens: %d %v", n, err)
			}
			if c, err := tx.GetHostCertificate("01"); err != nil || c.RevokedAt.IsZero() || c.Host != "h1" || !c.NotAfter.Equal(exp) {
				t.Fatalf("01 after revoke: %+v %v", c, err)
			}
			if c, err := tx.GetHostCertificate("03"); err != nil || !c.RevokedAt.IsZero() {
				t.Fatalf("h2's 03 after revoking h1: %+v %v", c, err)
			}
			if _, err := tx.GetHostCertificate("05"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("an unknown serial: %v", err)
			}
			if _, _, err := tx.TakeJoinToken("cc"); err != nil {
				t.Fatalf("h2's token after revoking h1: %v", err)
			}
			if err := tx.PutJoinToken("dd", "h2", time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)); err != nil {
				return err
			}
			if err := tx.PutJoinToken("ee", "h2", exp); err != nil {
				return err
			}
			if err := tx.DeleteExpiredJoinTokens(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)); err != nil {
				return err
			}
			if _, _, err := tx.TakeJoinToken("dd"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("an expired token after the sweep: %v", err)
			}
			if _, _, err := tx.TakeJoinToken("ee"); err != nil {
				t.Fatalf("a valid token after the sweep: %v", err)
			}
			if _, err := tx.AddHost("h2"); err != nil {
				return err
			}
			loads, err := tx.ListHostLoads(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
			if err != nil || len(loads) != 2 || loads[0].Certificates != 0 || loads[1].Name != "h2" || loads[1].Certificates != 1 {
				t.Fatalf("valid certificates: %+v %v", loads, err)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})
}
