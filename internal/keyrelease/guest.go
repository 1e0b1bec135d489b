package keyrelease

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
	"github.com/vtpmd/vtpmd/internal/attestor"
)

// Fetch is the guest's side of a release: the registered agent a asks
// vtpmd for secret name of instance instanceID and opens the answer in its
// TPM (Unwrap), after checking that it is bound to that instance and name.
// It returns the payload and the answer as it came (which opens nowhere
// else).
func Fetch(ctx context.Context, a *attestor.Agent, instanceID, name string) ([]byte, api.WrappedSecret, error) {
	ak, ok := a.AK()
	if !ok {
		return nil, api.WrappedSecret{}, errors.New("not registered")
	}
	ws, err := a.API.ReleaseSecret(ctx, instanceID, name)
	if err != nil {
		return nil, ws, err
	}
	payload, err := Open(a, ak, ws)
	return payload, ws, err
}

// Open opens a release ws in the TPM of agent a, whose AK ak is loaded.
func Open(a *attestor.Agent, ak tpm2.NamedHandle, ws api.WrappedSecret) ([]byte, error) {
	w, err := Parse(ws.Wrapped)
	if err != nil {
		return nil, err
	}
	// Binding: instance, incarnation, name, release, each ended by a 0.
	f := bytes.Split(w.Binding, []byte{0})
	if len(f) != 5 || string(f[0]) != ws.InstanceID || string(f[2]) != ws.Name || string(f[3]) != ws.ReleaseID {
		return nil, fmt.Errorf("the release is bound to another instance, secret or release than instance %s's %s", ws.InstanceID, ws.Name)
	}
	ek, err := strconv.ParseUint(ws.EKHandle, 0, 32)
	if err != nil {
		return nil, fmt.Errorf("EK handle %q: %w", ws.EKHandle, err)
	}
	return Unwrap(a.TPM, ak, tpm2.TPMHandle(ek), w)
}

// Holder is what a guest keeps of the secrets it fetched, in a directory
// private to its agent on a memory file system (/run/vtpm-guest): the
// registered agent's token, for `vtpm-guest secret get` to use the
// agent's registration, and where each secret was written, for the agent
// to forget it when it is revoked. It never holds a secret itself.
type Holder struct{ Dir string }

// nameRE is the form of a secret's name (the server's rule).
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// DefaultHolderDir is the guest agent's directory (tmpfs on systemd
// guests).
const DefaultHolderDir = "/run/vtpm-guest"

func (h Holder) tokenPath() string             { return filepath.Join(h.Dir, "agent-token") }
func (h Holder) recordPath(name string) string { return filepath.Join(h.Dir, "secrets", name) }

// SaveToken keeps the registered agent's token (0600).
func (h Holder) SaveToken(token string) error {
	if err := os.MkdirAll(h.Dir, 0o700); err != nil {
		return err
	}
	return atomicfile.Write(h.tokenPath(), []byte(token), 0o600)
}

// Token is the token SaveToken kept.
func (h Holder) Token() (string, error) {
	b, err := os.ReadFile(h.tokenPath())
	if errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("no agent token in %s: is the guest agent (vtpm-guest watch) running?", h.Dir)
	}
	return string(b), err
}

// Remember records that secret name was written to path.
func (h Holder) Remember(name, path string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%q is no secret name", name)
	}
	if err := os.MkdirAll(filepath.Dir(h.recordPath(name)), 0o700); err != nil {
		return err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	return atomicfile.Write(h.recordPath(name), []byte(abs), 0o600)
}

// Forget overwrites and removes the file secret name was written to, if
// any, and its record.
func (h Holder) Forget(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%q is no secret name", name)
	}
	b, err := os.ReadFile(h.recordPath(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	path := string(b)
	if f, err := os.OpenFile(path, os.O_WRONLY, 0); err == nil {
		if fi, err := f.Stat(); err == nil {
			f.Write(make([]byte, fi.Size()))
			f.Sync()
		}
		f.Close()
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.Remove(h.recordPath(name))
}

// Revoke is the guest's answer to secret name's revocation: it runs the
// tenant's action (sh -c action, with VTPM_SECRET=name in its
// environment, its output to out) and then forgets the secret.
func (h Holder) Revoke(ctx context.Context, name, action string, out io.Writer) error {
	var errs []error
	if action != "" {
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", action)
		cmd.Env = append(os.Environ(), "VTPM_SECRET="+name)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Run(); err != nil {
			errs = append(errs, fmt.Errorf("revocation action for %s: %w", name, err))
		}
	}
	return errors.Join(append(errs, h.Forget(name))...)
}
