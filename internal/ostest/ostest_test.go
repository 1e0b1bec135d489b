package ostest

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/google/uuid"
)

// TestBringUp proves what the OpenStack tests rely on: every cloud gets a
// token; the catalog names Barbican; a member stores a vTPM secret the way
// Nova does and reads it back the way castellan does, byte for byte;
// another project and a reader are refused; the secret outlives a restart
// of Barbican and is gone after its delete.
func TestBringUp(t *testing.T) {
	env := Up(t)
	tokens := map[string]string{}
	for _, name := range []string{"admin", "admin-system", "vtpmd", "vtpmd-a", "vtpmd-b", "vtpmd-a-reader"} {
		tokens[name] = Token(t, env.Cloud(name))
	}
	if c := env.Cloud("admin-system"); c.SystemScope != "all" || c.ProjectName != "" {
		t.Errorf("admin-system: system scope %q, project %q", c.SystemScope, c.ProjectName)
	}

	status, body := do(t, "GET", env.KeystoneURL+"/auth/catalog", tokens["vtpmd-a"], "application/json", nil)
	if status != http.StatusOK {
		t.Fatalf("catalog: %d %s", status, body)
	}
	var catalog struct {
		Catalog []struct {
			Type      string `json:"type"`
			Endpoints []struct {
				Interface string `json:"interface"`
				URL       string `json:"url"`
			} `json:"endpoints"`
		} `json:"catalog"`
	}
	if err := json.Unmarshal(body, &catalog); err != nil {
		t.Fatal(err)
	}
	public := ""
	for _, s := range catalog.Catalog {
		for _, e := range s.Endpoints {
			if s.Type == "key-manager" && e.Interface == "public" {
				public = e.URL
			}
		}
	}
	if public != env.BarbicanURL {
		t.Errorf("catalog: key-manager public endpoint %q, want %q", public, env.BarbicanURL)
	}

	// Nova's passphrase: 384 random bytes in base64, 512 ASCII bytes,
	// stored as octet-stream in base64 (facts §3).
	random := make([]byte, 384)
	rand.Read(random)
	passphrase := []byte(base64.StdEncoding.EncodeToString(random))
	name := "vTPM secret for instance " + uuid.NewString()
	create, _ := json.Marshal(map[string]string{
		"name":                     name,
		"secret_type":              "passphrase",
		"payload":                  base64.StdEncoding.EncodeToString(passphrase),
		"payload_content_type":     "application/octet-stream",
		"payload_content_encoding": "base64",
	})
	if status, body := do(t, "POST", env.BarbicanURL+"/v1/secrets/", tokens["vtpmd-a-reader"], "application/json", create); status != http.StatusForbidden {
		t.Errorf("reader creates: %d %s, want 403", status, body)
	}
	status, body = do(t, "POST", env.BarbicanURL+"/v1/secrets/", tokens["vtpmd-a"], "application/json", create)
	if status != http.StatusCreated {
		t.Fatalf("create: %d %s", status, body)
	}
	var created struct {
		SecretRef string `json:"secret_ref"`
	}
	if err := json.Unmarshal(body, &created); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(created.SecretRef, env.BarbicanURL+"/v1/secrets/") {
		t.Fatalf("secret_ref %q", created.SecretRef)
	}
	secret := env.BarbicanURL + "/v1/secrets/" + created.SecretRef[strings.LastIndex(created.SecretRef, "/")+1:]

	// castellan's get: the metadata, then the payload in its default
	// content type.
	readBack := func(token string) {
		t.Helper()
		status, body := do(t, "GET", secret, token, "application/json", nil)
		if status != http.StatusOK {
			t.Fatalf("metadata: %d %s", status, body)
		}
		var meta struct {
			Name         string            `json:"name"`
			SecretType   string            `json:"secret_type"`
			ContentTypes map[string]string `json:"content_types"`
		}
		if err := json.Unmarshal(body, &meta); err != nil {
			t.Fatal(err)
		}
		if meta.Name != name || meta.SecretType != "passphrase" || meta.ContentTypes["default"] != "application/octet-stream" {
			t.Fatalf("metadata: %s", body)
		}
		status, body = do(t, "GET", secret+"/payload", token, meta.ContentTypes["default"], nil)
		if status != http.StatusOK || !bytes.Equal(body, passphrase) {
			t.Fatalf("payload: %d, %d bytes, equal %v", status, len(body), bytes.Equal(body, passphrase))
		}
	}
	readBack(tokens["vtpmd-a"])

	for _, req := range []struct{ method, url string }{{"GET", secret}, {"GET", secret + "/payload"}, {"DELETE", secret}} {
		if status, body := do(t, req.method, req.url, tokens["vtpmd-b"], "application/json", nil); status != http.StatusForbidden {
			t.Errorf("vtpmd-b %s %s: %d %s, want 403", req.method, req.url, status, body)
		}
	}

	StopBarbican(t)
	if _, err := http.Get(secret); err == nil {
		t.Error("Barbican answers while stopped")
	}
	StartBarbican(t)
	readBack(tokens["vtpmd-a"])

	if status, body := do(t, "DELETE", secret, tokens["vtpmd-a"], "", nil); status != http.StatusNoContent {
		t.Fatalf("delete: %d %s", status, body)
	}
	if status, _ := do(t, "GET", secret+"/payload", tokens["vtpmd-a"], "application/octet-stream", nil); status != http.StatusNotFound {
		t.Errorf("payload after delete: %d, want 404", status)
	}
}

// do sends one request with the token and returns the status and body.
func do(t *testing.T, method, url, token, accept string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Auth-Token", token)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, got
}
