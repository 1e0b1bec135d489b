// Package agenttest gives benchmarks of the agent and the agent protocol a
// load generator's backend: RecordingBackend runs no TPM at all, it counts
// what the agent asks of it and answers as a swtpm host would, so that many
// simulated hosts fit on one machine and what is measured is the agent, the
// protocol and the control plane, not swtpm.
package agenttest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// RecordingBackend is a load generator's agent.Backend: it only records
// what it is asked. Ensure returns the same certified EK pair (RSA-2048 and
// ECC P-256, as swtpm makes them) for every vTPM; Sockets names paths
// where a swtpm host would serve them. Its zero value is ready.
type RecordingBackend struct {
	ensures, stops, destroys atomic.Int64
}

var _ agent.Backend = (*RecordingBackend)(nil)

// Name implements agent.Backend.
func (b *RecordingBackend) Name() string { return "recording" }

// Capabilities implements agent.Backend: a swtpm host's.
func (b *RecordingBackend) Capabilities(context.Context) (spec.Capabilities, error) {
	return spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V12, spec.V20}, Models: []spec.Model{spec.TIS, spec.CRB}}, nil
}

// Ensure implements agent.Backend.
func (b *RecordingBackend) Ensure(context.Context, agent.VTPM, []byte) ([]agent.EK, error) {
	b.ensures.Add(1)
	return eks(), nil
}

// Stop implements agent.Backend.
func (b *RecordingBackend) Stop(context.Context, agent.VTPM) error {
	b.stops.Add(1)
	return nil
}

// Destroy implements agent.Backend.
func (b *RecordingBackend) Destroy(context.Context, agent.VTPM) error {
	b.destroys.Add(1)
	return nil
}

// Sockets implements agent.Backend.
func (b *RecordingBackend) Sockets(instanceID string) api.Sockets {
	dir := filepath.Join("/var/lib/vtpmd/vtpms", instanceID)
	return api.Sockets{Data: filepath.Join(dir, "data.sock"), Ctrl: filepath.Join(dir, "ctrl.sock")}
}

// Calls is how many times Ensure, Stop and Destroy were called, together.
func (b *RecordingBackend) Calls() int64 {
	return b.ensures.Load() + b.stops.Load() + b.destroys.Load()
}

// eks is the EK pair every vTPM of a RecordingBackend has, made once.
var eks = sync.OnceValue(func() []agent.EK {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "recording backend EK CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(1, 0, 0)}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		panic(err)
	}
	eccKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	ek := func(kind swtpm.EKKind, handle, nv uint32, pub crypto.PublicKey) agent.EK {
		pubDER, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			panic(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(handle)), Subject: pkix.Name{}, KeyUsage: x509.KeyUsageKeyEncipherment,
			NotBefore: ca.NotBefore, NotAfter: ca.NotAfter}
		certDER, err := x509.CreateCertificate(rand.Reader, tmpl, ca, pub, caKey)
		if err != nil {
			panic(err)
		}
		return agent.EK{Kind: string(kind), Handle: handle, NVIndex: nv, PublicDER: pubDER, CertDER: certDER}
	}
	return []agent.EK{
		ek(swtpm.RSA2048, swtpm.RSAEKHandle, swtpm.RSAEKCertNV, rsaKey.Public()),
		ek(swtpm.ECCP256, swtpm.ECCEKHandle, swtpm.ECCEKCertNV, eccKey.Public()),
	}
})
