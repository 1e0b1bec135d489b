package api

// Readiness is GET /readyz's answer: whether this server replica should
// take requests (a load balancer's health check), and why not. It names
// what it checks, never how the replica reaches it.
type Readiness struct {
	Ready  bool             `json:"ready"`
	Checks []ReadinessCheck `json:"checks"`
}

// ReadinessCheck is one thing a replica needs to serve: "database" (the
// store answers), "schema" (the database's schema is the one this build
// migrates to), "keys" (the deployment's keys are loaded and the store's
// master key is the one this replica holds).
type ReadinessCheck struct {
	Name  string `json:"name"`
	Ready bool   `json:"ready"`
	// Message says what is wrong, for people; empty when ready.
	Message string `json:"message,omitempty"`
}
