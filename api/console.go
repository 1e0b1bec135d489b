package api

import "time"

// ConsoleLink is a sign-in link to the web console (/ui/), made by the
// operator (POST /v1/console/links): whoever opens it within its lifetime
// signs in as the operator, or with ?project= as that project's viewer.
// Treat it as a password.
type ConsoleLink struct {
	URL string `json:"url"`
	// Project is the one project the link shows; "" for the operator's
	// view of everything.
	Project   string    `json:"project,omitempty"`
	ExpiresAt time.Time `json:"expires_at"`
}
