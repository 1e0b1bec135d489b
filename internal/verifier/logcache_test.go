package verifier

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"slices"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Instances that boot the same firmware share its parsed log: the second
// instance's evidence, and every instance's next push, find it, while the
// quote, its nonce and counters are still checked on each; a log no quote
// vouched for is never kept.
func TestEvidenceSharesParsedLogs(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	const inst2 = "0b8e6f2a-3c1d-4e5f-8a9b-7c6d5e4f3a21"
	err := f.store.Update(ctx, func(tx *store.Tx) error {
		return tx.CreateVTPM(&store.VTPM{InstanceID: inst2, Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
			Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: inst2})
	})
	if err != nil {
		t.Fatal(err)
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	log, pcrs := attesttest.EventLog([]attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}, {PCR: 4, Type: 0x80000003, Data: []byte("kernel")}})
	now := f.clock.Now()
	for _, id := range []string{inst, inst2} {
		a := &store.Attestation{InstanceID: id, RegisteredAt: now, Verdict: store.VerdictPending,
			AKPublic: attesttest.AKPublic(attest.RSAAKTemplate, key), AgentTokenHash: bearer.Hash("agent " + id)}
		a.StaleAt = f.v.staleAt(a)
		if err := f.store.Update(ctx, func(tx *store.Tx) error { return tx.PutAttestation(a) }); err != nil {
			t.Fatal(err)
		}
	}
	clock := uint64(1000)
	push := func(id string, eventLog []byte, damage func(sig []byte)) Status {
		t.Helper()
		sub, err := f.v.Instance(ctx, operator, id)
		if err != nil {
			t.Fatal(err)
		}
		n, err := f.v.Nonce(ctx, sub, "agent "+id)
		if err != nil {
			t.Fatal(err)
		}
		clock += 1000
		quote, sig, err := attesttest.Quote(key, n.Nonce, pcrs, clock)
		if err != nil {
			t.Fatal(err)
		}
		if damage != nil {
			damage(sig)
		}
		st, err := f.v.Evidence(ctx, sub, "agent "+id, api.EvidenceRequest{Nonce: n.Nonce, Attest: quote, Signature: sig, PCRs: pcrs, EventLog: eventLog})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	stats := func(want attest.LogCacheStats) {
		t.Helper()
		got := f.v.LogCacheStats()
		if got.Hits != want.Hits || got.Misses != want.Misses || got.Logs != want.Logs {
			t.Fatalf("log cache %+v, want %+v", got, want)
		}
	}
	if st := push(inst, slices.Clone(log), nil); st.Verdict != store.VerdictPending {
		t.Fatalf("the first instance: %+v", st)
	}
	stats(attest.LogCacheStats{Misses: 1, Logs: 1})
	if st := push(inst2, slices.Clone(log), nil); st.Verdict != store.VerdictPending {
		t.Fatalf("the second instance, the same log: %+v", st)
	}
	stats(attest.LogCacheStats{Hits: 1, Misses: 1, Logs: 1})
	if st := push(inst, slices.Clone(log), nil); st.Verdict != store.VerdictPending {
		t.Fatalf("the first instance's next push: %+v", st)
	}
	stats(attest.LogCacheStats{Hits: 2, Misses: 1, Logs: 1})
	f.store.View(ctx, func(tx *store.Tx) error {
		for _, id := range []string{inst, inst2} {
			if a, err := tx.GetAttestation(id); err != nil || !bytes.Equal(a.EventLog, log) {
				t.Fatalf("%s keeps %x, %v", id, a.EventLog, err)
			}
		}
		return nil
	})

	// The cached log with a forged signature: the quote is still checked.
	st := push(inst2, slices.Clone(log), func(sig []byte) { sig[len(sig)-1] ^= 1 })
	if st.Verdict != store.VerdictUntrusted || st.Reasons[0] != "the quote is not signed by the registered attestation key" {
		t.Fatalf("a forged signature with a known log: %+v", st)
	}
	stats(attest.LogCacheStats{Hits: 3, Misses: 1, Logs: 1})
	// A log whose kernel digest was changed parses but does not replay to
	// the quote: judged so, and not kept.
	bad := slices.Clone(log)
	i := bytes.LastIndex(bad, []byte("kernel")) - 4 - 32
	bad[i] ^= 0xff
	st = push(inst2, bad, nil)
	if st.Verdict != store.VerdictUntrusted || st.Reasons[0] != "the event log does not replay to the quoted PCR 4" {
		t.Fatalf("a log that does not replay: %+v", st)
	}
	stats(attest.LogCacheStats{Hits: 3, Misses: 2, Logs: 1})
}
