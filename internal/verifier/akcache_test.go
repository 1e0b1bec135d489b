package verifier

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/bearer"
	"github.com/vtpmd/vtpmd/internal/store"
)

// A verifier keeps each registration's AK parsed, and sees a new
// registration made through another server: evidence is judged by the AK
// the store holds, never by one parsed before.
func TestParsedAKFollowsRegistration(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	other := New(Config{Store: f.store, VTPMs: f.v.cfg.VTPMs, Now: f.clock.Now}) // another replica
	log, pcrs := attesttest.EventLog([]attesttest.Measurement{{PCR: 0, Type: 8, Data: []byte("firmware")}})
	register := func() *rsa.PrivateKey {
		t.Helper()
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		f.put(t, &store.Attestation{RegisteredAt: f.clock.Now(), AKPublic: attesttest.AKPublic(attest.RSAAKTemplate, key),
			AgentTokenHash: bearer.Hash("token"), Verdict: store.VerdictPending})
		return key
	}
	push := func(v *Verifier, key *rsa.PrivateKey) Status {
		t.Helper()
		sub := f.instance(t)
		n, err := v.Nonce(ctx, sub, "token")
		if err != nil {
			t.Fatal(err)
		}
		f.clock.advance(time.Millisecond)
		q, sig, err := attesttest.Quote(key, n.Nonce, pcrs, uint64(f.clock.Now().UnixMilli()))
		if err != nil {
			t.Fatal(err)
		}
		st, err := v.Evidence(ctx, sub, "token", api.EvidenceRequest{Nonce: n.Nonce, Attest: q, Signature: sig, PCRs: pcrs, EventLog: log})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}

	first := register()
	if st := push(f.v, first); st.Verdict != store.VerdictPending {
		t.Fatalf("evidence of the first AK: %+v", st)
	}
	parsed, _ := f.v.aks.parse(inst, attesttest.AKPublic(attest.RSAAKTemplate, first))
	if again, _ := f.v.aks.parse(inst, attesttest.AKPublic(attest.RSAAKTemplate, first)); again != parsed {
		t.Fatal("the registration's AK was parsed again")
	}

	second := register() // as another replica would store it
	if st := push(f.v, first); st.Verdict != store.VerdictUntrusted || !strings.Contains(st.Reasons[0], "attestation key") {
		t.Fatalf("evidence of the replaced AK: %+v", st)
	}
	if st := push(f.v, second); st.Verdict != store.VerdictPending {
		t.Fatalf("evidence of the new AK: %+v", st)
	}
	if st := push(other, second); st.Verdict != store.VerdictPending {
		t.Fatalf("evidence of the new AK, through the other replica: %+v", st)
	}
}

// The cache holds at most its size of AKs.
func TestParsedAKsBounded(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	public := attesttest.AKPublic(attest.RSAAKTemplate, key)
	c := akCache{size: 8}
	for i := range 20 {
		if _, err := c.parse(strconv.Itoa(i), public); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.m) != c.size {
		t.Fatalf("%d AKs kept, at most %d", len(c.m), c.size)
	}
	if _, err := c.parse("junk", []byte{0, 1, 2}); err == nil {
		t.Fatal("a junk AK was parsed")
	}
}
