package verifier

import (
	"bytes"
	"sync"

	"github.com/vtpmd/vtpmd/internal/attest"
)

// akCacheSize bounds the parsed AKs a verifier keeps (about 1.5 KiB
// each, 48 MiB at most): enough for the subjects a server judges, in turn.
const akCacheSize = 1 << 15

// akCache keeps the parsed AK of each registration, so that evidence is
// checked with a key parsed once, not once per quote (parsing costs as
// much as the check). An entry is keyed by the attestation record and
// holds the public area it was parsed from: a registration's AK never
// changes, and a new registration, made through any server, stores a new
// public area, which the next lookup compares. Past size entries an
// arbitrary one makes room.
type akCache struct {
	size int
	mu   sync.Mutex
	m    map[string]parsedAK
}

type parsedAK struct {
	public []byte // TPM2B_PUBLIC as registered
	ak     *attest.AK
}

// parse returns the AK public (a TPM2B_PUBLIC) registered for the record
// key, parsed.
func (c *akCache) parse(key string, public []byte) (*attest.AK, error) {
	c.mu.Lock()
	p, ok := c.m[key]
	c.mu.Unlock()
	if ok && bytes.Equal(p.public, public) {
		return p.ak, nil
	}
	ak, err := attest.ParseAK(public)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[string]parsedAK)
	}
	if _, ok := c.m[key]; !ok && len(c.m) >= c.size {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[key] = parsedAK{public: bytes.Clone(public), ak: ak}
	return ak, nil
}
