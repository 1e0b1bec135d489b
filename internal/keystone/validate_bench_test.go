package keystone

import (
	"context"
	"testing"
	"time"
)

// BenchmarkValidate is the cost of checking one caller's token: cached (a
// request after the first within the cache bound) and uncached (every
// request asks Keystone, GET /v3/auth/tokens), against the real Keystone.
func BenchmarkValidate(b *testing.B) {
	svc, user := keystoneCloud(b, "vtpmd"), keystoneCloud(b, "vtpmd-a")
	ctx := context.Background()
	tok, err := NewSession(user, nil).Token(ctx)
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name string
		ttl  time.Duration
	}{{"cached", 0}, {"uncached", -1}} {
		b.Run(bc.name, func(b *testing.B) {
			v := NewValidator(NewSession(svc, nil), ValidatorOptions{TTL: bc.ttl})
			if _, err := v.Validate(ctx, tok); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				if _, err := v.Validate(ctx, tok); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
