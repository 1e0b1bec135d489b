package barbican_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/barbican"
	"github.com/vtpmd/vtpmd/internal/keystone"
	"github.com/vtpmd/vtpmd/internal/ostest"
)

// open returns a Keyring on the real Barbican, as vtpmd's service user.
func open(t testing.TB) (*barbican.Keyring, ostest.Env) {
	t.Helper()
	env := ostest.Up(t)
	kr, err := barbican.New(barbican.Config{URL: env.BarbicanURL, Service: service(t, env)})
	if err != nil {
		t.Fatal(err)
	}
	return kr, env
}

// service is vtpmd's service user's Keystone session.
func service(t testing.TB, env ostest.Env) *keystone.Session {
	t.Helper()
	creds, err := keystone.LoadCloud(env.CloudsFile, "vtpmd")
	if err != nil {
		t.Fatal(err)
	}
	return keystone.NewSession(creds, nil)
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
	kr, env := open(t)
	member := ostest.Token(t, env.Cloud("vtpmd-a"))
	other := ostest.Token(t, env.Cloud("vtpmd-b"))
	service := ostest.Token(t, env.Cloud("vtpmd"))

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
			if status, got := castellanGet(t, env.BarbicanURL, tc.token, id); status != http.StatusOK || !bytes.Equal(got, passphrase) {
				t.Fatalf("castellan's read of vtpmd's secret: %d, equal %v", status, bytes.Equal(got, passphrase))
			}
			if status, _ := castellanGet(t, env.BarbicanURL, tc.stranger, id); status != http.StatusForbidden {
				t.Fatalf("another project's read: %d, want 403", status)
			}
			if _, err := kr.Get(keyring.WithToken(ctx, tc.stranger), id); !errors.Is(err, keyring.ErrForbidden) {
				t.Fatalf("Get with another project's token: %v, want ErrForbidden", err)
			}
			s, err := kr.Get(tc.ctx, id)
			if err != nil || !bytes.Equal(s.Payload, passphrase) || s.ID != id || time.Since(s.Created) > time.Hour {
				t.Fatalf("Get = %v, %v", s, err)
			}

			novas := novaStore(t, env.BarbicanURL, tc.token, instance, passphrase)
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
	kr, env := open(t)
	mine, err := kr.Create(ctx, "p", keyring.VTPMSecretName(uuid.NewString()), []byte("x"))
	if err != nil {
		t.Fatal(err)
	}
	defer kr.Delete(ctx, mine)
	asMember := keyring.WithToken(ctx, ostest.Token(t, env.Cloud("vtpmd-a")))
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
	env := ostest.Up(t)
	kr, err := barbican.New(barbican.Config{URL: "http://127.0.0.1:1", Service: service(t, env), Budget: time.Second})
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

// TestLostAnswer: a store whose answer is lost (Barbican made the secret,
// the connection broke before its 201 came back) is retried, and the
// secret the first attempt made is found by name and deleted: one secret
// is left.
func TestLostAnswer(t *testing.T) {
	ctx := context.Background()
	env := ostest.Up(t)
	target := strings.TrimPrefix(env.BarbicanURL, "http://")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer u.Close()
				go io.Copy(u, c)
				if conns.Add(1) == 1 {
					io.Copy(io.Discard, u) // Barbican answers; the answer is lost
					return
				}
				io.Copy(c, u)
			}()
		}
	}()
	kr, err := barbican.New(barbican.Config{URL: "http://" + ln.Addr().String(), Service: service(t, env)})
	if err != nil {
		t.Fatal(err)
	}
	name := keyring.VTPMSecretName(uuid.NewString())
	id, err := kr.Create(ctx, "p", name, []byte("made twice"))
	if err != nil {
		t.Fatal(err)
	}
	defer kr.Delete(ctx, id)
	if conns.Load() < 2 {
		t.Fatalf("the store was not retried (%d connections)", conns.Load())
	}
	req, _ := http.NewRequest(http.MethodGet, env.BarbicanURL+"/v1/secrets?"+url.Values{"name": {name}}.Encode(), nil)
	req.Header.Set("X-Auth-Token", ostest.Token(t, env.Cloud("vtpmd")))
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	var page struct {
		Secrets []struct {
			Ref string `json:"secret_ref"`
		} `json:"secrets"`
	}
	if err := json.NewDecoder(res.Body).Decode(&page); err != nil {
		t.Fatal(err)
	}
	if len(page.Secrets) != 1 || !strings.HasSuffix(page.Secrets[0].Ref, "/"+id) {
		t.Fatalf("secrets named %q: %+v, want only %s", name, page.Secrets, id)
	}
}
