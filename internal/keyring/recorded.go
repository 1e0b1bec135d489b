package keyring

import (
	"context"
	"errors"
	"fmt"
)

// A secret lives here and the record that names it (a vTPM's, a tenant's)
// lives in the store; no transaction spans both. CreateRecorded and
// ShredRecorded are the one place that knows the order that keeps the two
// consistent through failures and crashes, so that no caller writes the
// two steps by hand:
//
//   - Making: the secret first, then the record. A record never names a
//     secret that does not exist. If the record cannot be committed the
//     secret is deleted again; a crash in between leaves an orphan secret,
//     which vtpmd reclaims (at start, and now and then while it runs), and
//     so does a commit whose outcome is unknown (the database went away
//     while committing): the secret is kept, since the record may name it.
//   - Destroying: first commit the change after which no record can use
//     the secret any more (a vTPM marked deleted: no one may point it at
//     another secret or start it), then shred the secret at once, in the
//     same call. So a secret is never gone while a live record needs it,
//     and is gone by the time the request that destroyed its record is
//     answered, whatever else (a host agent still manufacturing) is in
//     flight. The record itself may go later.

// CreateRecorded stores payload as a new secret of project named name, then calls
// record with its id, which must commit whatever names the secret. If
// record fails the secret is deleted again and record's error returned,
// unless the error says the commit may have happened (MaybeCommitted).
func CreateRecorded(ctx context.Context, kr Keyring, project, name string, payload []byte, record func(id string) error) (string, error) {
	id, err := kr.Create(ctx, project, name, payload)
	if err != nil {
		return "", fmt.Errorf("creating secret: %w", err)
	}
	if err := record(id); err != nil {
		var mc maybeCommitted
		if errors.As(err, &mc) && mc.MaybeCommitted() {
			return "", err
		}
		if derr := Shred(ctx, kr, id); derr != nil {
			return "", errors.Join(err, derr)
		}
		return "", err
	}
	return id, nil
}

// maybeCommitted is an error of a commit whose outcome is unknown
// (*store.UnavailableError).
type maybeCommitted interface {
	error
	MaybeCommitted() bool
}

// ShredRecorded calls commit, which must commit a change after which no
// record uses the secrets it returns, and then shreds them. If commit
// fails nothing is shredded.
func ShredRecorded(ctx context.Context, kr Keyring, commit func() (ids []string, err error)) error {
	ids, err := commit()
	if err != nil {
		return err
	}
	return Shred(ctx, kr, ids...)
}

// Shred deletes the secrets ids; one already gone counts as shredded, and
// "" is skipped. It goes on when ctx is cancelled (a caller that gave up
// must not leave a secret half-destroyed) and returns every failure.
func Shred(ctx context.Context, kr Keyring, ids ...string) error {
	ctx = context.WithoutCancel(ctx)
	var errs []error
	for _, id := range ids {
		if id == "" {
			continue
		}
		if err := kr.Delete(ctx, id); err != nil && !errors.Is(err, ErrNotFound) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
