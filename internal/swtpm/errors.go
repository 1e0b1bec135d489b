package swtpm

import "errors"

var (
	// ErrWrongSecret: swtpm refused the state because it could not decrypt
	// it with the instance's secret (the state's HMAC did not verify). The
	// state is left exactly as it was.
	ErrWrongSecret = errors.New("the vTPM state does not open with this secret")

	// ErrNotManufactured: Start found no TPM state in the directory. swtpm
	// itself would silently make a blank, EK-less TPM there; vtpmd never
	// serves one.
	ErrNotManufactured = errors.New("no TPM state in the directory; manufacture it first")

	// ErrManufactured: Manufacture found a TPM state in the directory
	// already, and never overwrites one.
	ErrManufactured = errors.New("the directory already holds a TPM state")

	// ErrBusy: another swtpm still serves the directory (found through its
	// pid file or swtpm's own lock on the state).
	ErrBusy = errors.New("another swtpm serves this state directory")

	// ErrNoSecret: the instance has no secret; vtpmd keeps no state
	// unencrypted.
	ErrNoSecret = errors.New("no state-encryption secret")

	// ErrExited: swtpm ended before it served its sockets; the wrapping
	// error carries swtpm's last log lines.
	ErrExited = errors.New("swtpm exited")

	// ErrFailureMode: the TPM is in failure mode: it answers every command
	// but a few (GetCapability, GetTestResult) with TPM_RC_FAILURE
	// (TPM_FAILEDSELFTEST for 1.2) until swtpm restarts. libtpms enters it
	// when swtpm cannot write the state (a full disk); the state on disk is
	// the last one written whole.
	ErrFailureMode = errors.New("the TPM is in failure mode (as when swtpm cannot write its state: a full disk?)")
)
