package bearer

import "testing"

func TestTokens(t *testing.T) {
	token, hash, err := New()
	if err != nil {
		t.Fatal(err)
	}
	other, _, _ := New()
	switch {
	case len(token) != 43 || token == other:
		t.Fatalf("tokens %q and %q", token, other)
	case !Matches(token, hash):
		t.Fatal("a token does not match its hash")
	case Matches(other, hash), Matches("", hash), Matches(token, nil), Matches("", nil):
		t.Fatal("a token matches what it was not made with")
	}
}
