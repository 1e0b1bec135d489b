package barbican_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/barbican"
	"github.com/vtpmd/vtpmd/internal/keystone"
)

// open returns a Keyring on the real Barbican, as vtpmd's service user.
func open(t testing.TB) (*barbican.Keyring, *cloud) {
	t.Helper()
	os := up(t)
	creds, err := keystone.LoadCloud(os.Clouds, "vtpmd")
	if err != nil {
		t.Fatal(err)
	}
	kr, err := barbican.New(barbican.Config{URL: os.Barbican, Service: keystone.NewSession(creds, nil)})
	if err != nil {
		t.Fatal(err)
	}
	return kr, os
}

// castellanGet reads a secret exactly as castellan's BarbicanKeyManager
// does (Nova's ensure_vtpm_secret): the metadata, then the payload with the
// Accept header its content_types.default names.
func castellanGet(t *testing.T, base, token, id string) (status int, payload []byte) {
	t.Helper()
	get := func(url, accept string) (*http.Response, []byte) {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("X-Auth-Token", token)
		req.Header.Set("Accept", accept)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res, b
	}
	res, body := get(base+"/v1/secrets/"+id, "application/json")
	if res.StatusCode != http.StatusOK {
		return res.StatusCode, nil
	}
	var m struct {
		SecretType   string            `json:"secret_type"`
		Name         string            `json:"name"`
		ContentTypes map[string]string `json:"content_types"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	if m.SecretType != "passphrase" || m.ContentTypes["default"] != "application/octet-stream" {
		t.Errorf("metadata %s: want a passphrase secret of application/octet-stream, as Nova stores it", body)
	}
	res, body = get(base+"/v1/secrets/"+id+"/payload", m.ContentTypes["default"])
	return res.StatusCode, body
}

// novaStore stores a secret exactly as Nova does (castellan's POST).
func novaStore(t *testing.T, base, token, instance string, passphrase []byte) string {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"name": "vTPM secret for instance " + instance, "secret_type": "passphrase",
		"payload": base64.StdEncoding.EncodeToString(passphrase), "payload_content_type": "application/octet-stream",
		"payload_content_encoding": "base64"})
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/secrets/", bytes.NewReader(body))
	req.Header.Set("X-Auth-Token", token)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var out struct {
		Ref string `json:"secret_ref"`
	}
	if err := json.NewDecoder(res.Body).Decode(&out); err != nil || res.StatusCode != http.StatusCreated {
		t.Fatalf("Nova's store: %d %v", res.StatusCode, err)
	}
	return out.Ref[strings.LastIndexByte(out.Ref, '/')+1:]
}

// TestNovaShape: a vTPM secret vtpmd stores, as the service or as a
// project's member, is what Nova's castellan reads, byte for byte, with a
// token of the project that stored it and no other; vtpmd reads what
// Nova's call stores; delete shreds it.
func TestNovaShape(t *testing.T) {
	ctx := context.Background()
	kr, cloud := open(t)
	member := token(t, "vtpmd-a")
	other := token(t, "vtpmd-b")
	service := token(t, "vtpmd")

	for _, tc := range []struct {
		name, token, stranger string
		ctx                   context.Context
	}{
		{"deployment", service, member, ctx},
		{"user", member, other, keyring.WithToken(ctx, member)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			instance := uuid.NewString()
			passphrase, err := keyring.NewVTPMSecret()
			if err != nil {
				t.Fatal(err)
			}
			id, err := kr.Create(tc.ctx, "p", keyring.VTPMSecretName(instance), passphrase)
			if err != nil {
				t.Fatal(err)
			}
			if status, got := castellanGet(t, cloud.Barbican, tc.token, id); status != http.StatusOK || !bytes.Equal(got, passphrase) {
				t.Fatalf("castellan's read of vtpmd's secret: %d, equal %v", status, bytes.Equal(got, passphrase))
			}
			if status, _ := castellanGet(t, cloud.Barbican, tc.stranger, id); status != http.StatusForbidden {
				t.Fatalf("another project's read: %d, want 403", status)
			}
			if _, err := kr.Get(keyring.WithToken(ctx, tc.stranger), id); !errors.Is(err, keyring.ErrForbidden) {
				t.Fatalf("Get with another project's token: %v, want ErrForbidden", err)
			}
			s, err := kr.Get(tc.ctx, id)
			if err != nil || !bytes.Equal(s.Payload, passphrase) || s.ID != id || time.Since(s.Created) > time.Hour {
				t.Fatalf("Get = %v, %v", s, err)
			}

			novas := novaStore(t, cloud.Barbican, tc.token, instance, passphrase)
			if s, err := kr.Get(tc.ctx, novas); err != nil || !bytes.Equal(s.Payload, passphrase) {
				t.Fatalf("vtpmd's read of Nova's secret: %v, %v", s, err)
			}
			for _, id := range []string{id, novas} {
				if err := kr.Delete(tc.ctx, id); err != nil {
					t.Fatal(err)
				}
				if _, err := kr.Get(tc.ctx, id); !errors.Is(err, keyring.ErrNotFound) {
					t.Fatalf("Get after Delete: %v", err)
				}
				if err := kr.Delete(tc.ctx, id); !errors.Is(err, keyring.ErrNotFound) {
					t.Fatalf("second Delete: %v", err)
				}
			}
		})
	}
}

// TestList: the service's List holds what vtpmd's service user stored in
// its project, and nothing a member stored in theirs.
func TestList(t *testing.T) {
	ctx := context.Background()
	kr, _ := open(t)
	mine, err := kr.Create(ctx, "p", keyring.VTPMSecretName(uuid.NewString()), []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	defer kr.Delete(ctx, mine)
	asMember := keyring.WithToken(ctx, token(t, "vtpmd-a"))
	theirs, err := kr.Create(asMember, "p", keyring.VTPMSecretName(uuid.NewString()), []byte("y"))
	if err != nil {
		t.Fatal(err)
	}
	defer kr.Delete(asMember, theirs)
	ids, err := kr.List(asMember) // the caller's token is not used
	if err != nil {
		t.Fatal(err)
	}
	has := map[string]bool{}
	for _, id := range ids {
		has[id] = true
	}
	if !has[mine] || has[theirs] {
		t.Fatalf("List = %v: want %s in it and not %s", ids, mine, theirs)
	}
}

// TestUnavailable: a Barbican that does not answer fails each operation
// with ErrUnavailable within the budget, after retries.
func TestUnavailable(t *testing.T) {
	ctx := context.Background()
	_, cloud := open(t)
	creds, err := keystone.LoadCloud(cloud.Clouds, "vtpmd")
	if err != nil {
		t.Fatal(err)
	}
	kr, err := barbican.New(barbican.Config{URL: "http://127.0.0.1:1", Service: keystone.NewSession(creds, nil), Budget: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kr.Create(ctx, "p", "n", []byte("x")); !errors.Is(err, keyring.ErrUnavailable) {
		t.Fatalf("Create: %v, want ErrUnavailable", err)
	}
	if _, err := kr.Get(ctx, uuid.NewString()); !errors.Is(err, keyring.ErrUnavailable) {
		t.Fatalf("Get: %v, want ErrUnavailable", err)
	}
}

// TEMPORARY until internal/ostest lands: the script's state.
type cloud struct{ Clouds, Barbican string }

func up(t testing.TB) *cloud {
	return &cloud{Clouds: "/var/lib/vtpmd-openstack/keystone/clouds.yaml", Barbican: "http://127.0.0.1:9311"}
}

func token(t testing.TB, name string) string {
	c, err := keystone.LoadCloud("/var/lib/vtpmd-openstack/keystone/clouds.yaml", name)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := keystone.NewSession(c, nil).Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
