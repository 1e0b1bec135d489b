package bundle

import "errors"

// ErrCorrupt: the bundle does not parse, is truncated, or fails its
// authentication (a byte changed, or sealed with another key): nothing in it
// can be trusted. The API's bundle_corrupt.
var ErrCorrupt = errors.New("the state bundle is corrupt or was changed")

// ErrMismatch: the bundle is another vTPM's (its header names another
// instance or incarnation than the one it is opened for). The API's
// bundle_mismatch.
var ErrMismatch = errors.New("the state bundle belongs to another vTPM")
