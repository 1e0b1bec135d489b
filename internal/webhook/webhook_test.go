package webhook

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
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
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

// Deliveries queued before the webhook runs (a restart) go out, each
// instance's in order, a failed one holding back the instance's later
// ones (not another instance's); one that keeps failing is given up after
// Attempts. Every attempt at a delivery carries its id, in the header and
// the token's jti.
func TestWebhookOutbox(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	st := storetest.Open(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, _ := attest.NewSigner(key)

	var mu sync.Mutex
	var got []string
	calls, ids := 0, map[string][]string{} // payload → the delivery ids of its attempts
	failures := map[string]int{"first": 1, "never": 99}
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		var body api.VerdictToken
		json.NewDecoder(r.Body).Decode(&body)
		payload, err := attest.VerifyToken(body.Token, attest.TokenOptions{JWKS: signer.JWKS(), Issuer: attest.TokenIssuer, AnyInstance: true, Now: time.Now()})
		var claims struct{ Sub, N, JTI string }
		if err != nil || json.Unmarshal(payload, &claims) != nil {
			t.Errorf("webhook body: %v", err)
		}
		if id := r.Header.Get(api.WebhookDeliveryHeader); id == "" || id != claims.JTI {
			t.Errorf("delivery header %q, jti %q; want the same id", id, claims.JTI)
		}
		ids[claims.N] = append(ids[claims.N], claims.JTI)
		if failures[claims.N] > 0 {
			failures[claims.N]--
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		got = append(got, claims.Sub+":"+claims.N)
	}))
	defer receiver.Close()

	hook := New(Config{URL: receiver.URL, Signer: signer, Store: st, Backoff: 10 * time.Millisecond, Attempts: 3})
	err := st.Update(ctx, func(tx *store.Tx) error {
		for _, c := range []struct{ sub, n string }{{"i-1", "first"}, {"i-1", "never"}, {"i-1", "second"}, {"i-2", "other"}} {
			if err := hook.Enqueue(tx, map[string]any{"iss": attest.TokenIssuer, "sub": c.sub, "n": c.n}); err != nil {
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
	// first: failed, then delivered; never: 3 attempts, given up; second;
	// other, of another instance, not held back by never.
	if want := "[i-2:other i-1:first i-1:second]"; fmt.Sprint(got) != want || calls != 7 {
		t.Fatalf("delivered %v in %d calls; want %s in 7", got, calls, want)
	}
	if f := ids["first"]; len(f) != 2 || f[0] != f[1] || f[0] == ids["second"][0] {
		t.Fatalf("delivery ids of first's attempts %v, second's %v: want one id, first's own", f, ids["second"])
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

// counter is a webhook receiver that counts what it got: each delivery
// id, and each instance's deliveries in the order they arrived. It
// answers 503 to every failEvery'th call (0: none), which is then no
// delivery.
type counter struct {
	t         *testing.T
	signer    *attest.Signer
	failEvery int

	mu        sync.Mutex
	calls     int
	delivered map[string]int      // delivery id → times received
	order     map[string][]string // instance → what its deliveries said, as received
	firstOf   map[string]string   // what a delivery said → its delivery id
}

func newCounter(t *testing.T, signer *attest.Signer, failEvery int) *counter {
	return &counter{t: t, signer: signer, failEvery: failEvery, delivered: map[string]int{}, order: map[string][]string{}, firstOf: map[string]string{}}
}

func (c *counter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	if c.failEvery > 0 && c.calls%c.failEvery == 0 {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	var body api.VerdictToken
	json.NewDecoder(r.Body).Decode(&body)
	payload, err := attest.VerifyToken(body.Token, attest.TokenOptions{JWKS: c.signer.JWKS(), Issuer: attest.TokenIssuer, AnyInstance: true, Now: time.Now()})
	var claims struct{ Sub, N, JTI string }
	if err != nil || json.Unmarshal(payload, &claims) != nil {
		c.t.Errorf("webhook body: %v", err)
	}
	id := r.Header.Get(api.WebhookDeliveryHeader)
	if id != claims.JTI {
		c.t.Errorf("delivery header %q, jti %q", id, claims.JTI)
	}
	if c.delivered[id]++; c.delivered[id] == 1 {
		c.order[claims.Sub] = append(c.order[claims.Sub], claims.N)
		c.firstOf[claims.N] = id
	}
}

// Two servers on one database, each with its deliverer, each queueing
// some of the verdict changes: every delivery reaches the receiver once,
// each instance's in the order queued, though the receiver fails some
// calls (retried).
func TestWebhookReplicas(t *testing.T) {
	storetest.OnEngines(t, func(t *testing.T, open func() *store.Store) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		signer, _ := attest.NewSigner(key)
		recv := newCounter(t, signer, 7)
		receiver := httptest.NewServer(recv)
		defer receiver.Close()

		const instances, each = 6, 15
		var hooks []*Webhook
		var stores []*store.Store
		for _, name := range []string{"replica-a", "replica-b"} {
			st := open()
			hook := New(Config{URL: receiver.URL, Signer: signer, Store: st, Replica: name, Backoff: 5 * time.Millisecond, Attempts: 1000})
			hook.Start(ctx)
			hooks, stores = append(hooks, hook), append(stores, st)
		}
		// Changes queued through both, while both deliver.
		for n := range each {
			for i := range instances {
				r := (n + i) % 2
				err := stores[r].Update(ctx, func(tx *store.Tx) error {
					return hooks[r].Enqueue(tx, map[string]any{"iss": attest.TokenIssuer, "sub": fmt.Sprintf("i-%d", i), "n": fmt.Sprint(n)})
				})
				if err != nil {
					t.Fatal(err)
				}
			}
		}
		drained(t, stores[0])

		recv.mu.Lock()
		defer recv.mu.Unlock()
		if len(recv.delivered) != instances*each {
			t.Fatalf("%d deliveries received; want %d", len(recv.delivered), instances*each)
		}
		for id, n := range recv.delivered {
			if n != 1 {
				t.Errorf("delivery %s received %d times", id, n)
			}
		}
		var want []string
		for n := range each {
			want = append(want, fmt.Sprint(n))
		}
		for i := range instances {
			if got := recv.order[fmt.Sprintf("i-%d", i)]; fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("i-%d's deliveries arrived as %v; want %v", i, got, want)
			}
		}
	})
}

// A server that dies while posting a delivery (its context ends before it
// records it) leaves it claimed: no other server makes it, nor the
// instance's later ones, until the claim's lease runs out; then another
// server makes it again, with the same delivery id, and the later ones
// after it.
func TestWebhookTakeover(t *testing.T) {
	storetest.OnEngines(t, func(t *testing.T, open func() *store.Store) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		signer, _ := attest.NewSigner(key)
		recv := newCounter(t, signer, 0)
		posted := make(chan string, 1)
		var once sync.Once
		receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hung := false
			once.Do(func() { hung = true })
			if hung { // the dying server's: the receiver got it, no answer reached the server
				io.Copy(io.Discard, r.Body) // then the server notices the client going away
				posted <- r.Header.Get(api.WebhookDeliveryHeader)
				<-r.Context().Done()
				return
			}
			recv.ServeHTTP(w, r)
		}))
		defer receiver.Close()

		a, b := open(), open()
		dying, die := context.WithCancel(context.Background())
		defer die()
		hookA := New(Config{URL: receiver.URL, Signer: signer, Store: a, Replica: "replica-a", Lease: 2 * time.Second})
		err := a.Update(dying, func(tx *store.Tx) error {
			for _, n := range []string{"0", "1"} {
				if err := hookA.Enqueue(tx, map[string]any{"iss": attest.TokenIssuer, "sub": "i-1", "n": n}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		hookA.Start(dying)
		first := <-posted
		die()

		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var left []store.Delivery
		b.View(ctx, func(tx *store.Tx) (err error) { left, err = tx.Deliveries(10); return err })
		if len(left) != 2 || left[0].ClaimedBy != "replica-a" || left[0].DeliveryID != first {
			t.Fatalf("the outbox as replica-a died: %+v; want its claim on %s, and the next waiting", left, first)
		}
		hookB := New(Config{URL: receiver.URL, Signer: signer, Store: b, Replica: "replica-b"})
		hookB.Start(ctx)
		drained(t, b)

		recv.mu.Lock()
		defer recv.mu.Unlock()
		if got := recv.order["i-1"]; fmt.Sprint(got) != "[0 1]" || recv.firstOf["0"] != first || recv.calls != 2 {
			t.Fatalf("replica-b delivered %v in %d calls, the first as %s; want [0 1] in 2, the first again as %s", got, recv.calls, recv.firstOf["0"], first)
		}
	})
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

// A delivery queued through one server is made by another's deliverer at
// once: the commit wakes it through PostgreSQL's notifications
// (store.OutboxChanged), long before it would look again by itself.
func TestWebhookWokenAcrossServers(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dsn := pgtest.DSN(t)
	open := func() *store.Store {
		st, err := store.OpenPostgres(ctx, dsn, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	queuer, deliverer := open(), open()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, _ := attest.NewSigner(key)
	recv := newCounter(t, signer, 0)
	receiver := httptest.NewServer(recv)
	defer receiver.Close()
	New(Config{URL: receiver.URL, Signer: signer, Store: deliverer, Replica: "b"}).Start(ctx)
	time.Sleep(100 * time.Millisecond)                                                   // its first look found nothing: it waits
	quiet := New(Config{URL: receiver.URL, Signer: signer, Store: queuer, Replica: "a"}) // queues, never started
	if err := queuer.Update(ctx, func(tx *store.Tx) error {
		return quiet.Enqueue(tx, map[string]any{"iss": attest.TokenIssuer, "sub": "i-1", "n": "1"})
	}); err != nil {
		t.Fatal(err)
	}
	// Well within idle (a minute), after which it would have looked anyway.
	for deadline := time.Now().Add(idle / 3); ; time.Sleep(10 * time.Millisecond) {
		recv.mu.Lock()
		n := len(recv.delivered)
		recv.mu.Unlock()
		if n == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the other server's deliverer did not wake for a delivery queued through this one")
		}
	}
}
