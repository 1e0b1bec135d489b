package keystone

import "errors"

var (
	// ErrUnavailable is Keystone not answering usefully: unreachable, a
	// timeout, a 5xx or a response that does not parse. A service maps it
	// to 503; trying again later may work.
	ErrUnavailable = errors.New("keystone unavailable")

	// ErrBadCredentials is Keystone refusing to issue a token for the
	// credentials given (wrong password, unknown user or project, a token
	// method with an expired token, a scope the user has no role on).
	ErrBadCredentials = errors.New("keystone refused the credentials")

	// ErrInvalidToken is a token that Keystone does not accept: malformed,
	// expired or revoked (Keystone answers 404 for each).
	ErrInvalidToken = errors.New("token not valid")

	// ErrNoEndpoint is a catalog without an endpoint for the service type,
	// interface and region asked for.
	ErrNoEndpoint = errors.New("no endpoint in the keystone catalog")

	// ErrNotProjectScoped is a token scoped to the system or a domain, or
	// unscoped, where a project is needed.
	ErrNotProjectScoped = errors.New("token is not scoped to a project")

	// ErrNoCloud is a clouds.yaml without the named cloud, or no clouds.yaml
	// at all where one was looked for.
	ErrNoCloud = errors.New("cloud not found")

	// ErrInsecureFile is a credentials file that group or others can
	// access, a symlink, or not a regular file.
	ErrInsecureFile = errors.New("credentials file is not private")

	// ErrIncomplete is credentials that cannot authenticate: no auth URL,
	// or neither a token nor a user name and password.
	ErrIncomplete = errors.New("incomplete keystone credentials")
)
