package api

import "time"

// ConsoleLink is a sign-in link to the web console (/ui/), made by the
// operator (POST /v1/console/links): whoever opens it first within its
// lifetime signs in as the operator, or with ?project= as that project's
// viewer. Treat it as a password.
type ConsoleLink struct {
	URL string `json:"url"`
	// Project is the one project the link shows; "" for the operator's
	// view of everything.
	Project   string    `json:"project,omitempty"`
	ExpiresAt time.Time `json:"expires_at"`
}

// ConsoleSessionsEnded answers DELETE /v1/console/sessions (operator):
// how many web console sessions and unused sign-in links it ended, on
// every server replica.
type ConsoleSessionsEnded struct {
	// Project is the one project whose sessions ended; "" for all.
	Project string `json:"project,omitempty"`
	Ended   int    `json:"ended"`
}
