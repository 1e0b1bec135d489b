package swtpmhost

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// The pool keeps manufactured TPM 2.0s ready, so that a create costs a
// swtpm start instead of an RSA key generation. Each pooled TPM is unique
// and used once. Its state is encrypted with a secret of its own that
// exists only in this process until a claim stores it in the key manager:
// pooled state whose secret died with a crash is wiped at start.
//
// A claim is crash-safe in this order: the agent has the secret stored
// under the tenant's project and the record pointed at it; adopt marks the
// pooled directory adopted and renames it to the instance's. A crash
// before the rename leaves a record keyed with a secret and no state,
// which the agent gives another TPM; after it, Adopted tells the agent the
// instance has its TPM.

const (
	poolDir     = ".pool"
	adoptedFile = "adopted"
	// A failed refill (a full disk, say) is retried after poolRetryMin,
	// doubling up to poolRetryMax while it keeps failing.
	poolRetryMin = time.Second
	poolRetryMax = time.Minute
)

type pooled struct {
	dir    string
	secret []byte
	proc   *swtpm.Process
}

type pool struct {
	size    int
	mu      sync.Mutex
	entries []*pooled
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// startPool wipes what an earlier process left in the pool and starts
// filling it with size TPMs.
func (r *Runtime) startPool(size int) error {
	dir := filepath.Join(r.cfg.Root, poolDir)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		swtpm.KillStale(swtpm.Instance{Dir: filepath.Join(dir, e.Name())})
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("wiping the pool: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	r.pool = &pool{size: size, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go r.fillPool()
	return nil
}

func (r *Runtime) fillPool() {
	p := r.pool
	defer close(p.done)
	pause := poolRetryMin
	for {
		p.mu.Lock()
		full := len(p.entries) >= p.size
		p.mu.Unlock()
		if full {
			select {
			case <-p.stop:
				return
			case <-p.wake:
			}
			continue
		}
		e, err := r.manufacturePooled()
		if err != nil {
			r.log.Warn("filling the vTPM pool", "err", err, "retry_in", pause)
			select {
			case <-p.stop:
				return
			case <-time.After(pause):
			}
			pause = min(2*pause, poolRetryMax)
			continue
		}
		pause = poolRetryMin
		p.mu.Lock()
		p.entries = append(p.entries, e)
		if len(p.entries) == p.size {
			r.log.Info("vTPM pool full", "size", p.size)
		}
		p.mu.Unlock()
	}
}

func (r *Runtime) manufacturePooled() (*pooled, error) {
	secret, err := keyring.NewVTPMSecret()
	if err != nil {
		return nil, err
	}
	name := make([]byte, 8)
	rand.Read(name)
	inst := swtpm.Instance{Dir: filepath.Join(r.cfg.Root, poolDir, hex.EncodeToString(name)), Version: spec.V20, Secret: secret,
		User: r.cfg.User, Group: r.cfg.Group, Binary: r.cfg.Binary}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, proc, err := r.make(ctx, agent.VTPM{Spec: spec.Spec{Version: spec.V20}}, inst, true)
	if err != nil {
		os.RemoveAll(inst.Dir) // its secret is gone with this call: nothing in it can be used
		return nil, err
	}
	return &pooled{dir: inst.Dir, secret: secret, proc: proc}, nil
}

// closePool stops filling and discards the pooled TPMs.
func (r *Runtime) closePool(ctx context.Context) {
	p := r.pool
	if p == nil {
		return
	}
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.entries {
		e.proc.Stop(ctx)
		os.RemoveAll(e.dir)
	}
	p.entries = nil
}

// Claim hands out a pooled TPM of version v, if one is ready (as
// agent.Pool's Claim): its secret goes to the key manager; adopt then moves
// the TPM to the instance; discard throws it away if that cannot happen.
func (r *Runtime) Claim(v spec.Version) (secret []byte, adopt func(ctx context.Context, instanceID string) error, discard func(), ok bool) {
	p := r.pool
	if p == nil || v != spec.V20 {
		return nil, nil, nil, false
	}
	p.mu.Lock()
	if len(p.entries) == 0 {
		p.mu.Unlock()
		return nil, nil, nil, false
	}
	e := p.entries[0]
	p.entries = p.entries[1:]
	p.mu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
	adopt = func(ctx context.Context, instanceID string) error {
		return r.adopt(ctx, e, instanceID)
	}
	discard = func() {
		e.proc.Stop(context.Background())
		os.RemoveAll(e.dir)
	}
	return e.secret, adopt, discard, true
}

// adopt stops the pooled TPM, marks it adopted and renames its directory
// to the instance's: from then on it is the instance's TPM, started by
// Ensure like any other.
func (r *Runtime) adopt(ctx context.Context, e *pooled, instanceID string) error {
	if err := e.proc.Stop(ctx); err != nil {
		return fmt.Errorf("stopping the pooled TPM: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(e.dir, adoptedFile), nil, 0o600); err != nil {
		return err
	}
	if err := os.Rename(e.dir, r.dir(instanceID)); err != nil {
		return fmt.Errorf("adopting the pooled TPM: %w", err)
	}
	return atomicfile.SyncDir(r.cfg.Root)
}

// Adopted reports whether the instance's TPM was adopted from the pool.
func (r *Runtime) Adopted(instanceID string) bool {
	_, err := os.Stat(filepath.Join(r.dir(instanceID), adoptedFile))
	return err == nil
}
