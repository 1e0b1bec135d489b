package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/api"
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
