package daemon

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// Two vtpmd server processes on one PostgreSQL database deliver one
// webhook outbox. The receiver never answers one delivery; the server
// posting it is killed (SIGKILL) with its claims. The other delivers
// everything: each delivery reaches the receiver (the killed server's
// unanswered ones again, after their lease, with the same delivery id),
// and each instance's in the order queued, a repeat never after a later
// one.
func TestServersDeliverWebhooksOnce(t *testing.T) {
	ctx := context.Background()
	c := &cluster{t: t, bin: buildVtpmd(t), dsn: pgtest.DSN(t)}
	st, err := store.OpenPostgres(ctx, c.dsn, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const instances, each, hungInstance, hungN = 8, 10, "i-3", "5"
	if err := enqueueDeliveries(ctx, st, instances, each); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	var got []receipt
	seen := map[string]bool{} // delivery ids received
	hung := make(chan string, 1)
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec, err := readReceipt(r)
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		first := rec.sub == hungInstance && rec.n == hungN && !seen[rec.id]
		got, seen[rec.id] = append(got, rec), true
		mu.Unlock()
		if first { // got it; the answer never reaches the server
			hung <- rec.id
			<-r.Context().Done()
		}
	}))
	defer receiver.Close()

	masterKey := filepath.Join(t.TempDir(), "master.key") // the deployment's, every replica's
	if _, err := embedded.NewMasterKeyFile(masterKey); err != nil {
		t.Fatal(err)
	}
	servers := map[int]*os.Process{}
	for _, name := range []string{"server-a", "server-b"} {
		dir := filepath.Join(t.TempDir(), name)
		cmd := c.start(dir+".log", "server", "--data-dir", dir, "--master-key-file", masterKey, "--listen", "127.0.0.1:0", "--store", c.dsn,
			"--webhook-url", receiver.URL)
		servers[cmd.Process.Pid] = cmd.Process
		op := client.New("unix://"+filepath.Join(dir, "api.sock"), "")
		c.eventually(name+" answers", func() error { _, err := op.Hosts(ctx); return err })
	}

	var hungID string
	select {
	case hungID = <-hung:
	case <-time.After(time.Minute):
		t.Fatal("the deliveries never reached the one the receiver keeps")
	}
	var outbox []store.Delivery
	st.View(ctx, func(tx *store.Tx) (err error) { outbox, err = tx.Deliveries(instances * each); return err })
	var holder int
	for _, d := range outbox {
		if d.DeliveryID == hungID {
			holder = claimant(d)
		}
	}
	if servers[holder] == nil {
		t.Fatalf("the delivery the receiver keeps is claimed by %d, none of the servers %v", holder, servers)
	}
	servers[holder].Signal(syscall.SIGKILL)

	c.eventually("the outbox is empty", func() error {
		var left []store.Delivery
		if err := st.View(ctx, func(tx *store.Tx) (err error) { left, err = tx.Deliveries(1); return err }); err != nil || len(left) > 0 {
			return fmt.Errorf("%d left, %v", len(left), err)
		}
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	times := map[string]int{}
	for _, r := range got {
		times[r.id]++
	}
	if len(times) != instances*each || times[hungID] != 2 {
		t.Fatalf("%d deliveries received, the kept one %d times; want %d, the kept one twice", len(times), times[hungID], instances*each)
	}
	if err := inOrder(got); err != nil {
		t.Error(err)
	}
	t.Logf("%d deliveries, %d receipts (repeats: the killed server's unanswered ones)", len(times), len(got))
}

// enqueueDeliveries queues each deliveries for each of instances
// instances (i-0, i-1, …) in the webhook outbox, one transaction, in
// rounds: every instance's n-th before any's n+1-th. Their claims name the
// instance (sub) and the delivery's number (n).
func enqueueDeliveries(ctx context.Context, st *store.Store, instances, each int) error {
	return st.Update(ctx, func(tx *store.Tx) error {
		for n := range each {
			for i := range instances {
				payload := fmt.Sprintf(`{"iss":"vtpmd","sub":"i-%d","n":"%d"}`, i, n)
				if err := tx.Enqueue(fmt.Sprintf("i-%d", i), []byte(payload)); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// receipt is a delivery a webhook receiver got: its delivery id, and the
// instance and number enqueueDeliveries gave it.
type receipt struct{ id, sub, n string }

// readReceipt reads a delivery as a receiver gets it. The servers sign
// with the deployment's verdict key, which this test does not hold: the
// token's claims are read without checking them. Its jti must be the
// delivery id of the header.
func readReceipt(r *http.Request) (receipt, error) {
	var body api.VerdictToken
	json.NewDecoder(r.Body).Decode(&body)
	io.Copy(io.Discard, r.Body)
	var claims struct{ Sub, N, JTI string }
	if parts := strings.Split(body.Token, "."); len(parts) == 3 {
		payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
		json.Unmarshal(payload, &claims)
	}
	id := r.Header.Get(api.WebhookDeliveryHeader)
	if id == "" || id != claims.JTI {
		return receipt{}, fmt.Errorf("delivery header %q, jti %q", id, claims.JTI)
	}
	return receipt{id, claims.Sub, claims.N}, nil
}

// inOrder checks that each instance's deliveries arrived in the order
// queued, a repeat only right after the delivery it repeats (never after
// a later one).
func inOrder(got []receipt) error {
	order := map[string][]string{}
	for _, r := range got {
		order[r.sub] = append(order[r.sub], r.n)
	}
	for sub, ns := range order {
		for k := 1; k < len(ns); k++ {
			if a, _ := strconv.Atoi(ns[k-1]); strconv.Itoa(a) != ns[k] && strconv.Itoa(a+1) != ns[k] {
				return fmt.Errorf("%s's deliveries arrived as %v: out of order", sub, ns)
			}
		}
	}
	return nil
}

// claimant is the pid of the server holding d's claim (0 for none): a
// replica names itself host/pid/random in what it claims.
func claimant(d store.Delivery) int {
	parts := strings.Split(d.ClaimedBy, "/")
	if len(parts) != 3 {
		return 0
	}
	pid, _ := strconv.Atoi(parts[1])
	return pid
}
