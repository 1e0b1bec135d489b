package verifier

import (
	"bytes"
	"testing"
)

// A verdict key signs the same after a round trip through its encoding,
// and each new one is another key.
func TestVerdictKey(t *testing.T) {
	der, err := NewVerdictKey()
	if err != nil {
		t.Fatal(err)
	}
	first, err := ParseVerdictKey(der)
	if err != nil {
		t.Fatal(err)
	}
	again, err := ParseVerdictKey(bytes.Clone(der))
	if err != nil || !bytes.Equal(first.JWKS(), again.JWKS()) {
		t.Fatalf("parsed again: %v, keys %s and %s", err, first.JWKS(), again.JWKS())
	}
	other, _ := NewVerdictKey()
	if s, _ := ParseVerdictKey(other); bytes.Equal(s.JWKS(), first.JWKS()) {
		t.Fatal("two new verdict keys are one")
	}
	if _, err := ParseVerdictKey([]byte("not a key")); err == nil {
		t.Fatal("garbage parsed as a verdict key")
	}
}
