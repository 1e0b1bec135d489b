package webhook

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// Deliveries queued before the webhook runs (a restart) go out, in
// order, a failed one holding back those after it; one that keeps failing
// is given up after Attempts.
func TestWebhookOutbox(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st := storetest.Open(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, _ := attest.NewSigner(key)

	var mu sync.Mutex
	var got []string
	calls, failFor := 0, map[int]bool{1: true} // the first call fails
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		var body api.VerdictToken
		json.NewDecoder(r.Body).Decode(&body)
		payload, err := attest.VerifyToken(body.Token, attest.TokenOptions{JWKS: signer.JWKS(), Issuer: attest.TokenIssuer, AnyInstance: true, Now: time.Now()})
		var claims struct{ Sub string }
		if err != nil || json.Unmarshal(payload, &claims) != nil {
			t.Errorf("webhook body: %v", err)
		}
		if failFor[calls] || claims.Sub == "never" {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		got = append(got, claims.Sub)
	}))
	defer receiver.Close()

	hook := New(Config{URL: receiver.URL, Signer: signer, Store: st, Backoff: 10 * time.Millisecond, Attempts: 3})
	err := st.Update(ctx, func(tx *store.Tx) error {
		for _, sub := range []string{"first", "never", "second"} {
			if err := hook.Enqueue(tx, map[string]any{"iss": attest.TokenIssuer, "sub": sub}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	hook.Start(ctx)
	drained(t, st)
	mu.Lock()
	defer mu.Unlock()
	// first: failed, then delivered; never: 3 attempts, given up; second.
	if len(got) != 2 || got[0] != "first" || got[1] != "second" || calls != 6 {
		t.Fatalf("delivered %v in %d calls; want [first second] in 6", got, calls)
	}
}

// A receiver that answers with a redirect does not get the signed verdict
// at the place it points to: the delivery fails (and is retried, then
// given up, as any failure) and the log says why.
func TestWebhookRefusesRedirects(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st := storetest.Open(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, _ := attest.NewSigner(key)

	var mu sync.Mutex
	hookCalls, elsewhere := 0, 0
	mux := http.NewServeMux()
	mux.HandleFunc("/hook", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		hookCalls++
		http.Redirect(w, r, "/elsewhere", http.StatusTemporaryRedirect)
	})
	mux.HandleFunc("/elsewhere", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		elsewhere++
	})
	receiver := httptest.NewServer(mux)
	defer receiver.Close()

	var logs lockedBuffer
	hook := New(Config{URL: receiver.URL + "/hook", Signer: signer, Store: st, Backoff: 10 * time.Millisecond, Attempts: 2,
		Log: slog.New(slog.NewTextHandler(&logs, nil))})
	if err := st.Update(ctx, func(tx *store.Tx) error { return hook.Enqueue(tx, map[string]any{"sub": "i-1"}) }); err != nil {
		t.Fatal(err)
	}
	hook.Start(ctx)
	drained(t, st)
	mu.Lock()
	defer mu.Unlock()
	if elsewhere != 0 || hookCalls != 2 {
		t.Fatalf("the redirect target got %d deliveries, the webhook URL %d calls; want 0 and 2 (both attempts refused)", elsewhere, hookCalls)
	}
	if log := logs.String(); !strings.Contains(log, "webhook delivery given up") || !strings.Contains(log, "redirect") {
		t.Fatalf("the log does not say the delivery failed on a redirect:\n%s", log)
	}
}

// lockedBuffer is a log sink the deliverer's goroutine and the test share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// drained waits until st's webhook outbox is empty: every delivery made or
// given up.
func drained(t *testing.T, st *store.Store) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var left []store.Delivery
		st.View(context.Background(), func(tx *store.Tx) (err error) { left, err = tx.Deliveries(10); return err })
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d deliveries still waiting", len(left))
		}
	}
}

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }
