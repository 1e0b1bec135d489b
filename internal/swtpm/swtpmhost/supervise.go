package swtpmhost

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/internal/swtpm"
)

// Restart backoff of a crashed swtpm: doubling from backoffMin to backoffMax,
// back to the minimum once a process has stayed up for healthyAfter.
const (
	backoffMin   = 50 * time.Millisecond
	backoffMax   = 10 * time.Second
	healthyAfter = 30 * time.Second
	stopTimeout  = 5 * time.Second
)

// supervisor keeps one vTPM's swtpm running until told to stop, or to
// let go of it (release) and leave it running.
type supervisor struct {
	r       *Runtime
	id      string
	inst    swtpm.Instance
	stop    chan struct{}
	release chan struct{}
	done    chan struct{}

	mu      sync.Mutex
	proc    *swtpm.Process
	lastErr error // set while restarts fail
}

// start runs id's swtpm under supervision unless it already is. The first
// start is synchronous so that its failure (a wrong secret, say) reaches the
// caller; later failures are retried, and reported by the next start call.
func (r *Runtime) start(ctx context.Context, id string, inst swtpm.Instance) error {
	r.mu.Lock()
	s := r.runs[id]
	r.mu.Unlock()
	if s != nil {
		return r.check(ctx, s)
	}
	var p *swtpm.Process
	var err error
	if inst.Keep {
		p, err = swtpm.Adopt(inst, r.log) // one an earlier vtpmd kept running
	}
	if err == nil && p == nil {
		p, err = swtpm.Start(ctx, inst, r.log)
	}
	if err != nil {
		return err
	}
	r.supervise(id, inst, p)
	return nil
}

// check reports whether s's swtpm works (swtpm.Process.Check, probing it
// when no client holds it), and repairs a TPM in failure mode
// (swtpm.ErrFailureMode) that no guest holds by restarting swtpm on its
// saved state, the last one written whole. A guest connected to it would
// lose its TPM (QEMU does not reconnect), so one a guest holds is left as
// it is and reported: the guest's stop and start restarts it.
func (r *Runtime) check(ctx context.Context, s *supervisor) error {
	s.mu.Lock()
	p, lastErr := s.proc, s.lastErr
	s.mu.Unlock()
	if p == nil {
		return lastErr
	}
	held, herr := r.clients.get()
	err := p.Check(ctx, herr == nil && !held[s.inst.CtrlSocket()] && !held[s.inst.DataSocket()])
	if !errors.Is(err, swtpm.ErrFailureMode) {
		return nil // exited: the supervisor restarts it
	}
	if guest, cerr := swtpm.Connected(s.inst.CtrlSocket()); cerr != nil || guest {
		return errors.Join(fmt.Errorf("%w; a guest is connected to it, so vtpmd leaves it running: stop and start the instance to restart its TPM on its saved state", err), cerr)
	}
	r.log.Warn("TPM in failure mode; restarting swtpm on its saved state", "instance", s.id, "pid", p.Pid(), "err", err)
	if err := r.Stop(ctx, s.id); err != nil {
		return err
	}
	return r.start(ctx, s.id, s.inst)
}

// clients remembers for a moment which sockets clients hold
// (swtpm.ConnectedSockets), so that a pass over many vTPMs reads
// /proc/net/unix once rather than once per vTPM.
type clients struct {
	mu   sync.Mutex
	at   time.Time
	held map[string]bool
	err  error
}

// clientsFresh is how long a reading of the held sockets is used; a
// client that connects meanwhile only makes a probe wait and prove nothing.
const clientsFresh = time.Second

// Connected says a client (a guest's QEMU) holds the control channel of
// id's vTPM, as read at most a second ago.
func (r *Runtime) Connected(id string) bool {
	held, err := r.clients.get()
	return err == nil && held[r.Sockets(id).Ctrl]
}

func (c *clients) get() (map[string]bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.at.IsZero() || time.Since(c.at) > clientsFresh {
		c.held, c.err = swtpm.ConnectedSockets()
		c.at = time.Now()
	}
	return c.held, c.err
}

// supervise keeps p, id's running swtpm, under supervision. If another
// start won a race for id, p is stopped and the winner kept.
func (r *Runtime) supervise(id string, inst swtpm.Instance, p *swtpm.Process) {
	s := &supervisor{r: r, id: id, inst: inst, proc: p, stop: make(chan struct{}), release: make(chan struct{}), done: make(chan struct{})}
	r.mu.Lock()
	if r.runs[id] != nil {
		r.mu.Unlock()
		sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		p.Stop(sctx)
		return
	}
	r.runs[id] = s
	r.mu.Unlock()
	go s.loop()
}

func (s *supervisor) loop() {
	defer close(s.done)
	backoff := backoffMin
	for {
		s.mu.Lock()
		p := s.proc
		s.mu.Unlock()
		started := time.Now()
		if p != nil {
			select {
			case <-s.stop:
				ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
				defer cancel()
				if err := p.Stop(ctx); err != nil {
					s.r.log.Warn("stopping swtpm", "instance", s.id, "err", err)
				}
				return
			case <-s.release:
				return
			case <-p.Done():
				s.r.log.Warn("swtpm exited; restarting", "instance", s.id, "pid", p.Pid(), "err", p.Err())
			}
			if time.Since(started) > healthyAfter {
				backoff = backoffMin
			}
		}
		select {
		case <-s.stop:
			return
		case <-s.release:
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, backoffMax)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		np, err := swtpm.Start(ctx, s.inst, s.r.log)
		cancel()
		s.mu.Lock()
		s.proc, s.lastErr = np, err
		s.mu.Unlock()
		if err != nil {
			s.r.log.Error("restarting swtpm failed", "instance", s.id, "err", err)
		}
	}
}

func (s *supervisor) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		return 0
	}
	return s.proc.Pid()
}

// Stop stops vTPM id's swtpm, if it runs here, and waits for it to exit;
// the state stays.
func (r *Runtime) Stop(ctx context.Context, id string) error {
	r.mu.Lock()
	s := r.runs[id]
	delete(r.runs, id)
	r.mu.Unlock()
	if s == nil {
		return nil
	}
	close(s.stop)
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// release stops supervising id's swtpm and leaves it running.
func (r *Runtime) release(id string) {
	r.mu.Lock()
	s := r.runs[id]
	delete(r.runs, id)
	r.mu.Unlock()
	if s != nil {
		close(s.release)
		<-s.done
	}
}

// Sweep kills swtpm processes that no supervisor here runs, found through
// the pid file in each vTPM directory: left behind by an earlier vtpmd
// that died without stopping them (swtpm normally dies with vtpmd through
// its parent death signal), or kept running (KeepRunning) for a vTPM that
// the first pass after a restart did not take back.
func (r *Runtime) Sweep() (killed int, err error) {
	dirs, err := os.ReadDir(r.cfg.Root)
	if err != nil {
		return 0, err
	}
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		if r.Running(d.Name()) != 0 {
			continue
		}
		dir := filepath.Join(r.cfg.Root, d.Name())
		pid, err := swtpm.KillStale(swtpm.Instance{Dir: dir})
		if err != nil {
			return killed, err
		}
		if pid != 0 {
			r.log.Warn("killed stale swtpm", "pid", pid, "dir", dir)
			killed++
		}
	}
	return killed, nil
}
