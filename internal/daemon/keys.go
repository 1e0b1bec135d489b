package daemon

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/verifier"
)

// sharedKeys are the deployment's own keys. Every server replica on one
// store holds the same: they are sealed in the store under the master key
// (embedded.Keyring.SealKey), made by the first replica to start on an
// empty store, in one transaction.
type sharedKeys struct {
	ekCA      *ca.CA         // certifies vTPMs' EKs
	hostCA    *ca.CA         // certifies hosts' agents (mTLS)
	verdicts  *attest.Signer // signs verdicts (tokens, webhooks)
	ticketKey []byte         // ties registrations to activations (verifier)
}

// The names of the deployment's keys in the store.
const (
	keyEKCA      = "ca"
	keyHostCA    = "host-ca"
	keyVerdicts  = "verdict-key"
	keyTicketKey = "ticket-key"
)

// openKeys opens the embedded key manager and the deployment's keys,
// making those the store lacks. A data dir from before the keys moved
// into the store is imported into it first (importLegacyKeys).
func openKeys(ctx context.Context, cfg Config, st *store.Store, log *slog.Logger) (*embedded.Keyring, sharedKeys, error) {
	legacy, err := findLegacyKeys(cfg)
	if err != nil {
		return nil, sharedKeys{}, err
	}
	kr, err := embedded.Open(ctx, st, cfg.MasterKeyFile)
	if err != nil {
		return nil, sharedKeys{}, fmt.Errorf("opening the key manager: %w", err)
	}
	var keys sharedKeys
	imported := 0
	err = st.Update(ctx, func(tx *store.Tx) error {
		raw := map[string][]byte{}
		defer func() {
			for _, b := range raw {
				clear(b)
			}
		}()
		for _, name := range []string{keyEKCA, keyHostCA, keyVerdicts, keyTicketKey} {
			b, err := kr.OpenKey(tx, name)
			if errors.Is(err, keyring.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			raw[name] = b
		}
		if legacy != nil {
			var err error
			if imported, err = legacy.importInto(tx, kr, raw); err != nil {
				return err
			}
		}
		return keys.fill(tx, kr, raw, cfg)
	})
	if err != nil {
		return nil, sharedKeys{}, fmt.Errorf("opening the deployment's keys: %w", err)
	}
	if legacy != nil {
		if err := legacy.remove(); err != nil {
			return nil, sharedKeys{}, fmt.Errorf("removing the keys imported into the store from %s: %w", cfg.DataDir, err)
		}
		log.Info("imported the data dir's keys into the store", "data_dir", cfg.DataDir, "secrets", imported)
	}
	return kr, keys, nil
}

// fill parses the keys in raw, making and sealing in tx those missing.
func (k *sharedKeys) fill(tx *store.Tx, kr *embedded.Keyring, raw map[string][]byte, cfg Config) error {
	ensure := func(name string, fn func() ([]byte, error)) error {
		if raw[name] != nil {
			return nil
		}
		b, err := fn()
		if err != nil {
			return fmt.Errorf("making %s: %w", name, err)
		}
		raw[name] = b
		return kr.SealKey(tx, name, b)
	}
	newCA := func(cn string) func() ([]byte, error) {
		return func() ([]byte, error) {
			c, err := ca.New(ca.Options{CommonName: cn, Organization: cfg.CAOrganization})
			if err != nil {
				return nil, err
			}
			return c.MarshalPEM()
		}
	}
	if err := errors.Join(
		ensure(keyEKCA, newCA("")),
		ensure(keyHostCA, newCA(ca.HostCommonName)),
		ensure(keyVerdicts, verifier.NewVerdictKey),
		ensure(keyTicketKey, func() ([]byte, error) { return verifier.NewTicketKey(), nil }),
	); err != nil {
		return err
	}
	var err error
	if k.ekCA, err = ca.Load(raw[keyEKCA], ca.Options{}); err != nil {
		return fmt.Errorf("the deployment CA: %w", err)
	}
	if k.hostCA, err = ca.Load(raw[keyHostCA], ca.Options{}); err != nil {
		return fmt.Errorf("the host CA: %w", err)
	}
	if k.verdicts, err = verifier.ParseVerdictKey(raw[keyVerdicts]); err != nil {
		return err
	}
	if len(raw[keyTicketKey]) != 32 {
		return fmt.Errorf("the ticket key is %d bytes, want 32", len(raw[keyTicketKey]))
	}
	k.ticketKey = append([]byte(nil), raw[keyTicketKey]...)
	return nil
}

// legacyKeys are the keys a server kept in its data dir before they moved
// into the store: keys/ (the embedded key manager: master.key and a
// <uuid>.sealed file per secret), ca/ and host-ca/ (ca.pem, and ca.json
// naming the secret of the CA's key) and verdict-key (the secret id of the
// verdict signing key). The first start of this version imports them into
// the store, under the same master key (linked to MasterKeyFile), and
// removes them.
type legacyKeys struct {
	dataDir string
}

// findLegacyKeys finds a data dir's legacy keys, and makes its master key
// the master key file's when that does not exist yet; nil if there are
// none.
func findLegacyKeys(cfg Config) (*legacyKeys, error) {
	dir := filepath.Join(cfg.DataDir, "keys")
	old := filepath.Join(dir, "master.key")
	if _, err := os.Stat(old); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err := os.Link(old, cfg.MasterKeyFile); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("moving %s to %s: %w", old, cfg.MasterKeyFile, err)
	}
	return &legacyKeys{dataDir: cfg.DataDir}, nil
}

// importInto imports the legacy keys into tx, where raw holds the
// deployment keys the store has. A store that has them already (another
// replica's, or this data dir's from an import interrupted before remove)
// must hold the same deployment CA; the key manager's secrets are then
// imported all the same, skipping those present.
func (l *legacyKeys) importInto(tx *store.Tx, kr *embedded.Keyring, raw map[string][]byte) (int, error) {
	keysDir := filepath.Join(l.dataDir, "keys")
	skip := map[string]bool{}
	for name, dir := range map[string]string{keyEKCA: "ca", keyHostCA: "host-ca"} {
		pemBytes, secretID, err := l.readCA(filepath.Join(l.dataDir, dir))
		if err != nil {
			return 0, err
		}
		skip[secretID] = true
		key, err := kr.OpenLegacy(keysDir, secretID)
		if err != nil {
			return 0, fmt.Errorf("the key of %s/%s: %w", l.dataDir, dir, err)
		}
		keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key.Payload})
		clear(key.Payload)
		combined := append(pemBytes, keyPEM...)
		if _, err := ca.Load(combined, ca.Options{}); err != nil {
			return 0, fmt.Errorf("%s/%s: %w", l.dataDir, dir, err)
		}
		if have := raw[name]; have != nil {
			if !strings.HasPrefix(string(have), string(pemBytes)) {
				return 0, fmt.Errorf("%s/%s holds another CA than the store's: this data dir belongs to another deployment; move its keys/, ca/, host-ca/ and verdict-key away", l.dataDir, dir)
			}
			continue
		}
		if err := kr.SealKey(tx, name, combined); err != nil {
			return 0, err
		}
		raw[name] = combined
	}
	if ref, err := os.ReadFile(filepath.Join(l.dataDir, "verdict-key")); err == nil {
		id := strings.TrimSpace(string(ref))
		skip[id] = true
		if raw[keyVerdicts] == nil {
			key, err := kr.OpenLegacy(keysDir, id)
			if err != nil {
				return 0, fmt.Errorf("the verdict key: %w", err)
			}
			if err := kr.SealKey(tx, keyVerdicts, key.Payload); err != nil {
				return 0, err
			}
			raw[keyVerdicts] = key.Payload
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return 0, err
	}
	return kr.ImportDir(tx, keysDir, skip)
}

// readCA reads a legacy CA directory: its certificate's PEM and the
// key manager's id of its key.
func (l *legacyKeys) readCA(dir string) (certPEM []byte, secretID string, err error) {
	ref, err := os.ReadFile(filepath.Join(dir, "ca.json"))
	if err != nil {
		return nil, "", err
	}
	var r struct {
		KeySecret string `json:"key_secret"`
	}
	if err := json.Unmarshal(ref, &r); err != nil {
		return nil, "", fmt.Errorf("%s/ca.json: %w", dir, err)
	}
	certPEM, err = os.ReadFile(filepath.Join(dir, "ca.pem"))
	return certPEM, r.KeySecret, err
}

// remove deletes the legacy keys once the store holds them; the master key
// stays, at MasterKeyFile.
func (l *legacyKeys) remove() error {
	var errs []error
	for _, name := range []string{"keys", "ca", "host-ca", "verdict-key"} {
		errs = append(errs, os.RemoveAll(filepath.Join(l.dataDir, name)))
	}
	return errors.Join(errs...)
}

// Rotation is what RotateMasterKey did.
type Rotation struct {
	From, To string // the master keys' IDs
	Resealed int    // blobs re-sealed under To
}

// RotateMasterKey re-seals every key in cfg's store, sealed under the
// master key in cfg.MasterKeyFile, under the one in newKeyFile (made with
// a fresh key if it does not exist), in one transaction. Run again after a
// failure, or once the store is under the new key, it finishes or does
// nothing. The caller then installs newKeyFile as every replica's
// MasterKeyFile: until then they fail with keyring.ErrMasterKeyMismatch
// (and read not ready), after it they carry on, no restart needed.
func RotateMasterKey(ctx context.Context, cfg Config, newKeyFile string) (Rotation, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return Rotation{}, fmt.Errorf("invalid configuration: %w", err)
	}
	next, err := embedded.ReadMasterKey(newKeyFile)
	if errors.Is(err, os.ErrNotExist) {
		next, err = embedded.NewMasterKeyFile(newKeyFile)
	}
	if err != nil {
		return Rotation{}, err
	}
	st, err := openStore(ctx, cfg)
	if err != nil {
		return Rotation{}, err
	}
	defer st.Close()
	kr, err := embedded.Open(ctx, st, cfg.MasterKeyFile)
	if errors.Is(err, keyring.ErrMasterKeyMismatch) {
		// Rotated already: the new key may finish what is left.
		kr, err = embedded.Open(ctx, st, newKeyFile)
	}
	if err != nil {
		return Rotation{}, err
	}
	r := Rotation{From: kr.MasterKeyID(), To: next.ID()}
	r.Resealed, err = kr.Rotate(ctx, next)
	return r, err
}
