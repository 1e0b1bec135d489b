package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// replicas runs n API servers, each on a store of its own on one fresh
// PostgreSQL database, as n vtpmd server processes would, with one key
// manager between them; it returns the store of the first and a client of
// each server's operator socket. Hosts are judged up for an hour after
// their last heartbeat, so that none goes down while a test runs.
func replicas(t *testing.T, n int) (*store.Store, *embedded.Keyring, []*http.Client) {
	t.Helper()
	return replicasOn(t, pgtest.DSN(t), n)
}

// replicasOn is replicas on the PostgreSQL database dsn names.
func replicasOn(t *testing.T, dsn string, n int) (*store.Store, *embedded.Keyring, []*http.Client) {
	t.Helper()
	masterKey := filepath.Join(t.TempDir(), "master.key")
	hostCA, err := ca.New(ca.Options{CommonName: ca.HostCommonName})
	if err != nil {
		t.Fatal(err)
	}
	var first *store.Store
	var firstKR *embedded.Keyring
	var clients []*http.Client
	for range n {
		st, err := store.OpenPostgres(context.Background(), dsn, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		kr, err := embedded.Open(context.Background(), st, masterKey)
		if err != nil {
			t.Fatal(err)
		}
		if first == nil {
			first, firstKR = st, kr
		}
		keys := secrets.New(st, kr, nil)
		vs := vtpms.New(vtpms.Config{Store: st, Keyring: kr, Secrets: keys, HeartbeatWindow: time.Hour})
		api := &Server{VTPMs: vs, Verifier: verifier.New(verifier.Config{Store: st, VTPMs: vs}), Secrets: keys,
			CAChainPEM: func() []byte { return nil }, Enrolment: enrol.New(enrol.Config{Store: st, HostCA: hostCA}),
			Agents:    agentstore.New(st, kr, nil, nil),
			Readiness: []ReadinessCheck{{Name: "database", Check: st.Ping}}}
		clients = append(clients, operatorSocket(t, api.Handler()))
	}
	return first, firstKR, clients
}

// send sends one JSON request to a replica's operator socket and returns
// its status and error code ("" for none).
func send(t *testing.T, c *http.Client, method, path string, body any) (int, api.Code) {
	t.Helper()
	var b bytes.Buffer
	if body != nil {
		json.NewEncoder(&b).Encode(body)
	}
	req, _ := http.NewRequest(method, "http://vtpmd"+path, &b)
	resp, err := c.Do(req)
	if err != nil {
		t.Error(err)
		return 0, ""
	}
	defer resp.Body.Close()
	var e api.ErrorBody
	if resp.StatusCode >= 400 {
		json.NewDecoder(resp.Body).Decode(&e)
	}
	return resp.StatusCode, e.Error.Code
}

// TestPlacementAcrossReplicas sends 300 creates at once over three servers
// on one PostgreSQL database, round robin, to hosts with room for 200:
// 250 instances, 50 of them asked for twice, on two servers. Every create is
// done (202) or refused with 409 no_valid_host, or already_exists for
// one of a pair; no host holds more than its capacity, no instance has
// two vTPMs, and exactly the created vTPMs have a secret and one

// putHosts registers hosts (name → capacity) that take TPM 2.0 vTPMs, as
// their agents would.
func putHosts(t *testing.T, st *store.Store, capacity map[string]int) {
	t.Helper()
	caps := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.TIS, spec.CRB}}
	err := st.Update(context.Background(), func(tx *store.Tx) error {
		for name, n := range capacity {
			if err := tx.PutHost(&store.Host{Name: name, Traits: spec.HostTraits(caps).List(), Capacity: n, Backend: "swtpm"}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// heldSecrets are the ids of the secrets kr holds.
func heldSecrets(t *testing.T, kr *embedded.Keyring) map[string]bool {
	t.Helper()
	ids, err := kr.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	held := map[string]bool{}
	for _, id := range ids {
		held[id] = true
	}
	return held
}

// "created" event.
func TestPlacementAcrossReplicas(t *testing.T) {
	st, kr, clients := replicas(t, 3)
	ctx := context.Background()
	capacity := map[string]int{"h1": 10, "h2": 20, "h3": 30, "h4": 60, "h5": 80}
	putHosts(t, st, capacity)
	var ids []string
	for range 250 {
		ids = append(ids, uuid.NewString())
	}
	asks := append(append([]string{}, ids...), ids[:50]...)

	type answer struct {
		status int
		code   api.Code
	}
	answers := make([]answer, len(asks))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, id := range asks {
		wg.Go(func() {
			<-start
			answers[i].status, answers[i].code = send(t, clients[i%len(clients)], "POST", "/v1/vtpms",
				create(id, map[string]string{"hw:tpm_version": "2.0"}))
		})
	}
	close(start)
	wg.Wait()

	created := map[string]int{}
	counts := map[string]int{}
	for i, a := range answers {
		counts[fmt.Sprintf("%d %s", a.status, a.code)]++
		switch {
		case a.status == http.StatusAccepted:
			created[asks[i]]++
		case a.status == http.StatusConflict && a.code == api.CodeNoValidHost:
		case a.status == http.StatusConflict && a.code == api.CodeAlreadyExists && (i < 50 || i >= len(ids)):
		default:
			t.Errorf("create %d of %s: %d %s", i, asks[i], a.status, a.code)
		}
	}
	t.Logf("answers: %v", counts)
	var vs []*store.VTPM
	if err := st.View(ctx, func(tx *store.Tx) (err error) { vs, err = tx.ListVTPMs(store.Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	onHost := map[string]int{}
	secretIDs := map[string]bool{}
	for _, v := range vs {
		onHost[v.Host]++
		secretIDs[v.SecretID] = true
		if created[v.InstanceID] != 1 {
			t.Errorf("instance %s has a vTPM, and %d creates of it were answered 202", v.InstanceID, created[v.InstanceID])
		}
		var evs []store.Event
		if err := st.View(ctx, func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(v.InstanceID, v.Incarnation); return err }); err != nil {
			t.Fatal(err)
		}
		if len(evs) != 1 || evs[0].Action != "created" {
			t.Errorf("instance %s's events: %+v, want one created", v.InstanceID, evs)
		}
	}
	if len(vs) != 200 || len(created) != 200 {
		t.Errorf("%d vTPMs recorded, %d instances answered 202; want 200 of each (the hosts' room, fewer than asked for)", len(vs), len(created))
	}
	for name, n := range capacity {
		if onHost[name] != n {
			t.Errorf("host %s holds %d vTPMs, capacity %d", name, onHost[name], n)
		}
	}
	if held := heldSecrets(t, kr); len(held) != len(secretIDs) || len(secretIDs) != len(vs) {
		t.Errorf("the key manager holds %d secrets, the vTPMs name %d distinct ones of %d: refused creates left theirs", len(held), len(secretIDs), len(vs))
	}
}

// TestRefreshAcrossReplicas: an agent's long poll held on one server is
// answered by a request for fresh evidence made through another, and a
// request made while no agent waits is collected, once, from any server.
func TestRefreshAcrossReplicas(t *testing.T) {
	st, _, clients := replicas(t, 2)
	ctx := context.Background()
	putHosts(t, st, map[string]int{"h1": 2})
	if code, e := send(t, clients[0], "POST", "/v1/vtpms", create(inst, map[string]string{"hw:tpm_version": "2.0"})); code != 202 {
		t.Fatalf("create: %d %s", code, e)
	}
	tokenHash := sha256.Sum256([]byte("agent-token"))
	err := st.Update(ctx, func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: inst, RegisteredAt: time.Now().UTC(), Verdict: "pending", AgentTokenHash: tokenHash[:]})
	})
	if err != nil {
		t.Fatal(err)
	}
	base := "http://vtpmd/v1/vtpms/" + inst + "/attestation/refresh"
	poll := func(c *http.Client, wait string) (api.Refresh, error) {
		var r api.Refresh
		req, _ := http.NewRequest("GET", base+"?wait="+wait, nil)
		req.Header.Set("Authorization", "Bearer agent-token")
		resp, err := c.Do(req)
		if err != nil {
			return r, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			return r, fmt.Errorf("long poll: %s", resp.Status)
		}
		return r, json.NewDecoder(resp.Body).Decode(&r)
	}
	ask := func(c *http.Client) api.Refresh {
		t.Helper()
		var r api.Refresh
		resp, err := c.Post(base, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || resp.StatusCode != 202 {
			t.Fatalf("refresh: %s %v", resp.Status, err)
		}
		return r
	}

	type polled struct {
		r   api.Refresh
		err error
	}
	got := make(chan polled)
	go func() {
		r, err := poll(clients[1], "60s")
		got <- polled{r, err}
	}()
	time.Sleep(100 * time.Millisecond) // let the poll start waiting; it works either way
	asked := ask(clients[0])
	if p := <-got; p.err != nil || !p.r.Requested || !p.r.RequestedAt.Equal(asked.RequestedAt) {
		t.Fatalf("the agent waiting on the other server got %+v, %v; want the request of %s", p.r, p.err, asked.RequestedAt)
	}
	asked = ask(clients[1])
	for i, want := range []bool{true, false} {
		r, err := poll(clients[0], "10ms")
		if err != nil || r.Requested != want || want && !r.RequestedAt.Equal(asked.RequestedAt) {
			t.Fatalf("poll %d after a request made through the other server: %+v, %v", i, r, err)
		}
	}
}

// TestPostgresOutage stops PostgreSQL for a few seconds under a small load
// of creates and reads spread over two servers: while it is down every
// request answers 503 store_unavailable (with Retry-After), none anything
// else; once it is back both serve again at once, by themselves. Nothing
// is lost or made twice: every create answered 202 has its vTPM, one
// "created" event and its secret, and a create answered 503, sent again,
// is made then (or found made, had its commit gone through as the
// connection went).
func TestPostgresOutage(t *testing.T) {
	st, kr, clients := replicas(t, 2)
	ctx := context.Background()
	putHosts(t, st, map[string]int{"h1": 100000})
	v20 := map[string]string{"hw:tpm_version": "2.0"}

	var mu sync.Mutex
	made := map[string]bool{} // created: answered 202
	var retry []string        // answered 503
	unavailable := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := uuid.NewString()
				c := clients[(w+i)%len(clients)]
				code, e := send(t, c, "POST", "/v1/vtpms", create(id, v20))
				getCode, getErr := send(t, clients[(w+i+1)%len(clients)], "GET", "/v1/vtpms?limit=5", nil)
				mu.Lock()
				switch {
				case code == http.StatusAccepted:
					made[id] = true
				case code == http.StatusServiceUnavailable && e == api.CodeStoreUnavailable:
					retry = append(retry, id)
					unavailable++
				default:
					t.Errorf("create during the outage test: %d %s", code, e)
				}
				switch {
				case getCode == http.StatusOK:
				case getCode == http.StatusServiceUnavailable && getErr == api.CodeStoreUnavailable:
					unavailable++
				default:
					t.Errorf("list during the outage test: %d %s", getCode, getErr)
				}
				wait := code == http.StatusServiceUnavailable
				mu.Unlock()
				if wait { // as a client told to retry would, if not for a second
					time.Sleep(200 * time.Millisecond)
				}
			}
		})
	}
	// created waits until n more creates were answered 202.
	created := func(n int) {
		t.Helper()
		mu.Lock()
		want := len(made) + n
		mu.Unlock()
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
			mu.Lock()
			got := len(made)
			mu.Unlock()
			if got >= want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d creates answered 202 in a minute, want %d", got-want+n, n)
			}
		}
	}
	created(20)

	pgtest.Halt(t)
	for i, c := range clients {
		storeUnavailable(t, i, c, "while PostgreSQL is down")
	}
	time.Sleep(3 * time.Second) // under load
	pgtest.Resume(t)

	for i, c := range clients {
		if code, e := send(t, c, "POST", "/v1/vtpms", create(uuid.NewString(), v20)); code != http.StatusAccepted {
			t.Errorf("server %d's first create after PostgreSQL came back: %d %s", i, code, e)
		}
	}
	created(20)
	close(stop)
	wg.Wait()
	if unavailable == 0 {
		t.Error("no request of the load met the outage")
	}
	for _, id := range retry {
		switch code, e := send(t, clients[0], "POST", "/v1/vtpms", create(id, v20)); {
		case code == http.StatusAccepted:
		case code == http.StatusConflict && e == api.CodeAlreadyExists:
			t.Logf("create of %s committed as its connection went (answered 503)", id)
		default:
			t.Errorf("create of %s again after the outage: %d %s", id, code, e)
		}
		made[id] = true
	}

	var vs []*store.VTPM
	if err := st.View(ctx, func(tx *store.Tx) (err error) { vs, err = tx.ListVTPMs(store.Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	secrets := heldSecrets(t, kr)
	recorded := map[string]bool{}
	for _, v := range vs {
		recorded[v.InstanceID] = true
		var evs []store.Event
		if err := st.View(ctx, func(tx *store.Tx) (err error) { evs, err = tx.ListEvents(v.InstanceID, v.Incarnation); return err }); err != nil {
			t.Fatal(err)
		}
		if len(evs) != 1 || evs[0].Action != "created" || !secrets[v.SecretID] {
			t.Errorf("vTPM %s: events %+v, secret kept %v; want one created, and its secret", v.InstanceID, evs, secrets[v.SecretID])
		}
	}
	for id := range made {
		if !recorded[id] {
			t.Errorf("create of %s was answered 202, and it has no vTPM", id)
		}
	}
	t.Logf("%d vTPMs made, %d answers 503 store_unavailable, %d creates sent again; %d secrets held", len(vs), unavailable, len(retry), len(secrets))
}

// storeUnavailable checks that server i, reached by c, answers a create
// and two reads 503 store_unavailable with Retry-After, and is alive but
// not ready, as it should when its database is unreachable.
func storeUnavailable(t *testing.T, i int, c *http.Client, when string) {
	t.Helper()
	for _, r := range []struct {
		method, path string
		body         any
	}{
		{"POST", "/v1/vtpms", create(uuid.NewString(), map[string]string{"hw:tpm_version": "2.0"})},
		{"GET", "/v1/vtpms/" + inst, nil},
		{"GET", "/v1/hosts", nil},
	} {
		req, _ := http.NewRequest(r.method, "http://vtpmd"+r.path, nil)
		if r.body != nil {
			b, _ := json.Marshal(r.body)
			req, _ = http.NewRequest(r.method, "http://vtpmd"+r.path, bytes.NewReader(b))
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e api.ErrorBody
		json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || e.Error.Code != api.CodeStoreUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Errorf("server %d, %s %s %s: %d %+v (Retry-After %q)", i, r.method, r.path, when, resp.StatusCode, e, resp.Header.Get("Retry-After"))
		}
	}
	// Alive, but not ready: a load balancer takes it out.
	if code, _ := send(t, c, "GET", "/healthz", nil); code != http.StatusOK {
		t.Errorf("server %d's /healthz %s: %d, want 200", i, when, code)
	}
	if code, _ := send(t, c, "GET", "/readyz", nil); code != http.StatusServiceUnavailable {
		t.Errorf("server %d's /readyz %s: %d, want 503", i, when, code)
	}
}
