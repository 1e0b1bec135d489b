package keyring

import "errors"

var (
	// ErrNotFound: no secret with that ID exists (never created, or deleted).
	ErrNotFound = errors.New("secret not found")

	// ErrInvalidID: the ID is not a canonical lowercase UUID
	// (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx). Such an ID is refused before
	// any storage is touched, so it can never name a path.
	ErrInvalidID = errors.New("secret id is not a canonical lowercase uuid")

	// ErrInvalidProject: the project is empty, longer than MaxProjectLen
	// bytes, or not valid UTF-8.
	ErrInvalidProject = errors.New("invalid project")

	// ErrInvalidPayload: the payload is empty or longer than MaxPayloadLen
	// bytes.
	ErrInvalidPayload = errors.New("invalid payload")

	// ErrInsecureMode: the master key file can be reached by group or
	// others (or is a symlink, or not a plain file), so the embedded
	// keyring refuses to use it rather than fix it silently.
	ErrInsecureMode = errors.New("insecure keyring file mode")

	// ErrBadMasterKey: the master key file is not exactly 32 bytes, or is
	// missing while the store holds keys sealed under it. It is never
	// replaced automatically: that would shred every secret sealed under it.
	ErrBadMasterKey = errors.New("unusable master key")

	// ErrMasterKeyMismatch: the store's keys are sealed under another
	// master key than the master key file holds: the file is another
	// deployment's, or the master key was rotated and this replica's file
	// not yet replaced. The message names both keys' IDs.
	ErrMasterKeyMismatch = errors.New("master key does not match the store's")

	// ErrCorrupt: a stored secret cannot be opened. Its blob was truncated or
	// altered, copied or renamed from another secret, or sealed under a
	// different master key. The payload is never returned in that case.
	ErrCorrupt = errors.New("sealed secret is corrupt or was tampered with")
)

// ErrUnavailable: the key manager did not answer, or answered that it
// cannot serve now (a 5xx, a timeout) after the provider's retries. The API
// answers 503 key_manager_unavailable; nothing was changed.
var ErrUnavailable = errors.New("key manager unavailable")

// ErrForbidden: the key manager refused the identity the request ran as
// (another project's secret, or a "user" secret asked for without its
// owner's token).
var ErrForbidden = errors.New("key manager refused access")
