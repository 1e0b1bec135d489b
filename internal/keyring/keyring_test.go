package keyring

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestNewVTPMSecret(t *testing.T) {
	a, err := NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewVTPMSecret()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range [][]byte{a, b} {
		if len(s) != 512 {
			t.Errorf("secret is %d bytes, want 512", len(s))
		}
		raw, err := base64.StdEncoding.Strict().DecodeString(string(s))
		if err != nil || len(raw) != 384 {
			t.Errorf("secret decodes to %d bytes, %v; want 384", len(raw), err)
		}
	}
	if bytes.Equal(a, b) {
		t.Error("two secrets are equal")
	}
}

func TestValidID(t *testing.T) {
	for range 100 {
		id, err := NewID()
		if err != nil {
			t.Fatal(err)
		}
		if !ValidID(id) {
			t.Fatalf("NewID() = %q, not valid", id)
		}
		if id[14] != '4' || !strings.ContainsRune("89ab", rune(id[19])) {
			t.Fatalf("NewID() = %q, not a version 4 RFC 9562 uuid", id)
		}
	}
	for id, want := range map[string]bool{
		"0f8fad5b-d9cb-469f-a165-70867728950e": true,
		"00000000-0000-0000-0000-000000000000": true,
		"0F8FAD5B-D9CB-469F-A165-70867728950E": false,
		"0f8fad5bd9cb469fa16570867728950e":     false,
		"0f8fad5b-d9cb-469f-a165-70867728950":  false,
		"0f8fad5b-d9cb-469f-a165_70867728950e": false,
		"":                                     false,
	} {
		if got := ValidID(id); got != want {
			t.Errorf("ValidID(%q) = %v, want %v", id, got, want)
		}
	}
}

// No fmt verb and no slog handler may show the payload, in any encoding.
func TestSecretDoesNotPrintPayload(t *testing.T) {
	payload := []byte("TOPSECRET-payload-0123456789")
	s := Secret{
		ID:      "0f8fad5b-d9cb-469f-a165-70867728950e",
		Project: "tenant",
		Payload: payload,
		Created: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
	}
	forbidden := []string{
		string(payload), "TOPSECRET",
		hex.EncodeToString(payload), strings.ToUpper(hex.EncodeToString(payload)),
		base64.StdEncoding.EncodeToString(payload)[:16],
		fmt.Sprint([]byte(payload))[:20], // "[84 79 80 …"
		fmt.Sprintf("%o", payload[:4]),
	}
	wrapped := struct{ S Secret }{s}
	var out []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%o", "%c", "%U", "%T %v"} {
		out = append(out,
			fmt.Sprintf(verb, s), fmt.Sprintf(verb, &s),
			fmt.Sprintf(verb, wrapped), fmt.Sprintf(verb, []Secret{s}),
			fmt.Sprintf(verb, map[string]Secret{"k": s}))
	}
	out = append(out, fmt.Sprint(s), fmt.Sprintln(s), s.String())

	var logs bytes.Buffer
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("secret", "secret", s, "ptr", &s)
	slog.New(slog.NewTextHandler(&logs, nil)).Info("secret", "secret", s, "ptr", &s)
	out = append(out, logs.String())

	for _, o := range out {
		for _, f := range forbidden {
			if strings.Contains(o, f) {
				t.Errorf("output %q contains payload (as %q)", o, f)
			}
		}
	}
	if str := fmt.Sprint(s); !strings.Contains(str, s.ID) || !strings.Contains(str, "28 bytes") {
		t.Errorf("fmt.Sprint(s) = %q, want the id and payload length", str)
	}
	var rec map[string]any
	first, _, _ := strings.Cut(logs.String(), "\n")
	if err := json.Unmarshal([]byte(first), &rec); err != nil {
		t.Fatal(err)
	}
	if g, ok := rec["secret"].(map[string]any); !ok || g["id"] != s.ID || g["payload_bytes"] != float64(len(payload)) {
		t.Errorf("JSON log record = %v, want secret.id and secret.payload_bytes", rec)
	}
}
