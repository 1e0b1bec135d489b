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

	// ErrInsecureMode: the keyring directory or master key file can be
	// reached by group or others (or is not a plain directory or file), so
	// the embedded keyring refuses to use it rather than fix it silently.
	ErrInsecureMode = errors.New("insecure keyring file mode")

	// ErrBadMasterKey: the master key file is not exactly 32 bytes, or is
	// missing while sealed secrets exist. It is never replaced
	// automatically: that would shred every secret sealed under it.
	ErrBadMasterKey = errors.New("unusable master key")

	// ErrCorrupt: a stored secret cannot be opened. Its blob was truncated or
	// altered, copied or renamed from another secret, or sealed under a
	// different master key. The payload is never returned in that case.
	ErrCorrupt = errors.New("sealed secret is corrupt or was tampered with")
)
