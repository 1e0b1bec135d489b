package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
	"github.com/vtpmd/vtpmd/internal/webhook"
)

// BenchmarkDetectionLatency measures, with 10,000 attesting instances
// registered, the time from a guest's evidence arriving at the API to the
// webhook receiving the signed verdict it changed. Each instance's
// evidence alternates between another boot and the learned one, so every
// push changes a verdict.
//
//	go test -run '^$' -bench DetectionLatency -benchtime 500x ./internal/server
func BenchmarkDetectionLatency(b *testing.B) {
	const instances = 10000
	dir := b.TempDir()
	st, err := store.Open(context.Background(), filepath.Join(dir, "db"), store.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	kr, _ := embedded.Open(context.Background(), st, filepath.Join(dir, "master.key"))
	log, err := os.ReadFile("../attest/testdata/ovmf-q35-eventlog.bin")
	if err != nil {
		b.Fatal(err)
	}
	events, _ := attest.ParseEventLog(log)
	good := map[int][]byte{}
	for i, v := range attest.Replay(events) {
		if i < 8 {
			good[i] = v
		}
	}
	akKey, _ := rsa.GenerateKey(rand.Reader, 2048) // one software AK serves every instance
	akPublic := attesttest.AKPublic(attest.RSAAKTemplate, akKey)
	tokenHash := sha256.Sum256([]byte("agent-token")) // and one agent token
	ids := make([]string, instances)
	err = st.Update(context.Background(), func(tx *store.Tx) error {
		if err := tx.PutHost(&store.Host{Name: "h1", Traits: []string{}, Capacity: instances, Backend: "swtpm"}); err != nil {
			return err
		}
		for i := range ids {
			ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
			if err := tx.CreateVTPM(&store.VTPM{InstanceID: ids[i], Project: "p1", Spec: spec.Spec{Version: spec.V20, Model: spec.TIS},
				Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive, SecretID: ids[i]}); err != nil {
				return err
			}
			if err := tx.PutAttestation(&store.Attestation{InstanceID: ids[i], EKKind: "rsa2048", AKPublic: akPublic,
				RegisteredAt: time.Now(), AgentTokenHash: tokenHash[:], Verdict: "trusted", PolicyPCRs: good, PolicyEventLog: log, EventLog: log}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}

	arrived := make(chan string, 1024)
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body api.VerdictToken
		json.NewDecoder(r.Body).Decode(&body)
		arrived <- body.Token
	}))
	defer receiver.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, _ := attest.NewSigner(key)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hook := webhook.New(webhook.Config{URL: receiver.URL, Signer: signer, Store: st})
	hook.Start(ctx)
	keys := secrets.New(st, kr, nil)
	vs := vtpms.New(vtpms.Config{Store: st, Keyring: kr, Secrets: keys})
	ver := verifier.New(verifier.Config{Store: st, VTPMs: vs, Signer: signer, Webhook: hook})
	srv := httptest.NewServer((&Server{VTPMs: vs, Verifier: ver, Secrets: keys, CAChainPEM: func() []byte { return nil }}).Handler())
	defer srv.Close()

	post := func(path string, in, out any) {
		var body []byte // none for the nonce: a body-less route refuses one
		if in != nil {
			body, _ = json.Marshal(in)
		}
		req, _ := http.NewRequest("POST", srv.URL+path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer agent-token")
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 200 {
			b.Fatalf("%s: %v %v", path, err, resp.Status)
		}
		defer resp.Body.Close()
		json.NewDecoder(resp.Body).Decode(out)
	}
	bad := map[int][]byte{}
	for i, v := range good {
		bad[i] = v
	}
	bad[4] = bytes.Repeat([]byte{0x4b}, 32)
	clocks := map[string]uint64{}
	flipped := map[string]bool{}
	var latencies []time.Duration
	b.ResetTimer()
	for n := range b.N {
		id := ids[(n*7919)%instances]
		var nonce api.Nonce
		post("/v1/vtpms/"+id+"/attestation/nonce", nil, &nonce)
		// Each push flips the instance's verdict (all start trusted).
		pcrs, want := bad, "untrusted"
		if flipped[id] {
			pcrs, want = good, "trusted"
		}
		flipped[id] = !flipped[id]
		clocks[id] += 1000
		attestBytes, sig, err := attesttest.Quote(akKey, nonce.Nonce, pcrs, clocks[id])
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		var out api.Attestation
		post("/v1/vtpms/"+id+"/attestation/evidence", api.EvidenceRequest{Nonce: nonce.Nonce, Attest: attestBytes, Signature: sig, PCRs: pcrs, EventLog: log}, &out)
		tok := <-arrived
		latencies = append(latencies, time.Since(start))
		if !strings.Contains(tok, ".") {
			b.Fatal("no token")
		}
		if out.Verdict != want { // else the latency is not a verdict change's
			b.Fatalf("%s: verdict %s %v, want %s", id, out.Verdict, out.Reasons, want)
		}
	}
	b.StopTimer()
	slices.Sort(latencies)
	b.ReportMetric(float64(latencies[len(latencies)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(latencies[len(latencies)*99/100].Microseconds())/1000, "ms-p99")
}
