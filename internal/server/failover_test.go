package server

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

// TestPostgresFailover runs two servers on a PostgreSQL primary with a
// hot standby, through the deployment guide's DSN (both servers, the
// primary first, target_session_attrs=read-write), crashes the primary
// once the standby has replayed its WAL, and promotes the standby: until
// then every request answers 503 store_unavailable with Retry-After and
// /readyz 503, none anything else; after it both servers, not restarted,
// serve again by themselves: every vTPM created before the crash is there
// with its secret, new ones are made, and an agent's long poll held on
// one server is answered by a request made through the other.
func TestPostgresFailover(t *testing.T) {
	pg := pgtest.NewReplicated(t)
	st, kr, clients := replicasOn(t, pg.DSN(pg.Primary, pg.Standby), 2)
	ctx := context.Background()
	putHosts(t, st, map[string]int{"h1": 100})
	v20 := map[string]string{"hw:tpm_version": "2.0"}
	made := []string{inst} // the created vTPMs
	for len(made) < 10 {
		made = append(made, uuid.NewString())
	}
	for i := range made {
		if code, e := send(t, clients[i%2], "POST", "/v1/vtpms", create(made[i], v20)); code != http.StatusAccepted {
			t.Fatalf("create %s before the failover: %d %s", made[i], code, e)
		}
	}
	tokenHash := sha256.Sum256([]byte("agent-token"))
	err := st.Update(ctx, func(tx *store.Tx) error {
		return tx.PutAttestation(&store.Attestation{InstanceID: inst, RegisteredAt: time.Now().UTC(), Verdict: "pending", AgentTokenHash: tokenHash[:]})
	})
	if err != nil {
		t.Fatal(err)
	}
	pg.CatchUp(t)

	pg.Primary.Stop(t)
	for i, c := range clients {
		storeUnavailable(t, i, c, "with the primary down and the standby not promoted")
	}
	pg.Promote(t)

	for i, c := range clients {
		if code, e := send(t, c, "GET", "/readyz", nil); code != http.StatusOK {
			t.Errorf("server %d's /readyz after the standby was promoted: %d %s", i, code, e)
		}
		for _, id := range made {
			if code, e := send(t, c, "GET", "/v1/vtpms/"+id, nil); code != http.StatusOK {
				t.Errorf("server %d, vTPM %s created before the failover: %d %s", i, id, code, e)
			}
		}
		if code, e := send(t, c, "POST", "/v1/vtpms", create(uuid.NewString(), v20)); code != http.StatusAccepted {
			t.Errorf("server %d's create after the failover: %d %s", i, code, e)
		}
	}
	var vs []*store.VTPM
	if err := st.View(ctx, func(tx *store.Tx) (err error) { vs, err = tx.ListVTPMs(store.Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	secrets := heldSecrets(t, kr)
	for _, v := range vs {
		if !secrets[v.SecretID] {
			t.Errorf("vTPM %s's secret is not in the key manager after the failover", v.InstanceID)
		}
	}
	if len(vs) != len(made)+len(clients) || len(secrets) != len(vs) {
		t.Errorf("after the failover: %d vTPMs and %d secrets, want %d of each", len(vs), len(secrets), len(made)+len(clients))
	}

	base := "http://vtpmd/v1/vtpms/" + inst + "/attestation/refresh"
	got := make(chan error, 1)
	go func() {
		req, _ := http.NewRequest("GET", base+"?wait=60s", nil)
		req.Header.Set("Authorization", "Bearer agent-token")
		resp, err := clients[1].Do(req)
		if err != nil {
			got <- err
			return
		}
		defer resp.Body.Close()
		var r api.Refresh
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || resp.StatusCode != http.StatusOK || !r.Requested {
			got <- fmt.Errorf("%s %+v, %v; want the request", resp.Status, r, err)
			return
		}
		got <- nil
	}()
	time.Sleep(100 * time.Millisecond) // let the poll start waiting; it works either way
	resp, err := clients[0].Post(base, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("refresh through the other server after the failover: %s", resp.Status)
	}
	if err := <-got; err != nil {
		t.Errorf("the agent's long poll after the failover: %v", err)
	}
}

// TestPostgresFailoverLosesUnreplicated shows what asynchronous
// replication loses in a failover: a create answered 202 while the
// standby received nothing (it was down) is gone once the standby is
// promoted, and its secret with it (the key manager keeps its secrets in
// the same database); what the standby had replayed is there, and the
// instance can be created again.
func TestPostgresFailoverLosesUnreplicated(t *testing.T) {
	pg := pgtest.NewReplicated(t)
	st, kr, clients := replicasOn(t, pg.DSN(pg.Primary, pg.Standby), 1)
	putHosts(t, st, map[string]int{"h1": 100})
	v20 := map[string]string{"hw:tpm_version": "2.0"}
	kept, lost := uuid.NewString(), uuid.NewString()
	if code, e := send(t, clients[0], "POST", "/v1/vtpms", create(kept, v20)); code != http.StatusAccepted {
		t.Fatalf("create before the standby stopped: %d %s", code, e)
	}
	pg.CatchUp(t)
	pg.Standby.Stop(t)
	if code, e := send(t, clients[0], "POST", "/v1/vtpms", create(lost, v20)); code != http.StatusAccepted {
		t.Fatalf("create on the primary alone: %d %s", code, e)
	}
	pg.Primary.Stop(t)
	pg.Standby.Start(t)
	pg.Promote(t)

	if code, e := send(t, clients[0], "GET", "/v1/vtpms/"+kept, nil); code != http.StatusOK {
		t.Errorf("the vTPM the standby had replayed: %d %s", code, e)
	}
	if code, e := send(t, clients[0], "GET", "/v1/vtpms/"+lost, nil); code != http.StatusNotFound {
		t.Errorf("the vTPM committed on the old primary alone: %d %s, want it lost (404)", code, e)
	}
	if held := heldSecrets(t, kr); len(held) != 1 {
		t.Errorf("the key manager holds %d secrets after the failover, want the replayed vTPM's alone", len(held))
	}
	if code, e := send(t, clients[0], "POST", "/v1/vtpms", create(lost, v20)); code != http.StatusAccepted {
		t.Errorf("the lost vTPM created again: %d %s", code, e)
	}
}
