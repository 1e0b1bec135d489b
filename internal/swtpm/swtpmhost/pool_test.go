package swtpmhost

import (
	"context"
	"crypto"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/internal/citest"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmtest"
)

type certifier struct{ ca *swtpmtest.CA }

func (c certifier) CertifyEK(ctx context.Context, _ string, _ spec.Version, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
	return c.ca.Certify(ctx, kind, pub)
}

// warnings counts the warnings logged with a given message and keeps
// their retry_in values.
type warnings struct {
	msg   string
	mu    sync.Mutex
	n     int
	waits []time.Duration
}

func (w *warnings) Enabled(context.Context, slog.Level) bool { return true }
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler       { return w }
func (w *warnings) WithGroup(string) slog.Handler            { return w }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	if r.Level == slog.LevelWarn && strings.Contains(r.Message, w.msg) {
		w.mu.Lock()
		w.n++
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "retry_in" {
				w.waits = append(w.waits, a.Value.Duration())
			}
			return true
		})
		w.mu.Unlock()
	}
	return nil
}

func (w *warnings) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n
}

// TestPoolOnFullDisk: refilling the pool on a full disk fails, each failed
// attempt leaves nothing behind in the pool directory, and the attempts
// back off; once the disk is freed the pool fills.
func TestPoolOnFullDisk(t *testing.T) {
	swtpmtest.Require(t)
	disk := citest.SmallDisk(t, 1<<20)
	root := filepath.Join(disk, "vtpms")
	free := citest.Fill(t, disk)
	w := &warnings{msg: "filling the vTPM pool"}
	r, err := New(Config{Root: root, PoolSize: 1, Certifier: certifier{swtpmtest.NewCA(t)}, Log: slog.New(w)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Close(context.Background())
		swtpmtest.CheckNoProcesses(t, root)
	})
	for deadline := time.Now().Add(time.Minute); w.count() < 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d failed refills logged in a minute; want 2", w.count())
		}
	}
	left, err := os.ReadDir(filepath.Join(root, poolDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range left {
		t.Errorf("a failed refill left %s in the pool directory", e.Name())
	}
	w.mu.Lock()
	waits := w.waits
	w.mu.Unlock()
	if len(waits) < 2 || waits[1] <= waits[0] {
		t.Errorf("pauses after failed refills %v; want them growing", waits)
	}
	free()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
		if ready, _ := filepath.Glob(filepath.Join(root, poolDir, "*", IdentityFile)); len(ready) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pool did not fill within a minute of the disk being freed")
		}
	}
}
