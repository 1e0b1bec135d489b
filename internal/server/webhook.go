package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
)

// Webhook posts every verdict change to URL as {"token": <signed verdict>}:
// the body is the same ES256 JWT as GET …/attestation/token, so a receiver
// authenticates it with the verifier's JWKS. Deliveries are retried with
// backoff; they live in memory, so a restart drops those still queued.
type Webhook struct {
	URL    string
	Signer *attest.Signer
	Log    *slog.Logger
	// Client defaults to one with a 10 s timeout.
	Client *http.Client
	// Backoff is the first retry's delay, doubling each time; default 500 ms.
	Backoff time.Duration
	// Attempts bounds the tries per notification; default 6.
	Attempts int

	queue chan map[string]any
}

// Start runs the deliveries until ctx ends.
func (h *Webhook) Start(ctx context.Context) {
	if h.Client == nil {
		h.Client = &http.Client{Timeout: 10 * time.Second}
	}
	if h.Backoff == 0 {
		h.Backoff = 500 * time.Millisecond
	}
	if h.Attempts == 0 {
		h.Attempts = 6
	}
	if h.Log == nil {
		h.Log = slog.New(slog.DiscardHandler)
	}
	h.queue = make(chan map[string]any, 1024)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case claims := <-h.queue:
				h.deliver(ctx, claims)
			}
		}
	}()
}

// notify queues a verdict change; it never blocks the API (a full queue
// drops it, logged).
func (h *Webhook) notify(claims map[string]any) {
	if h == nil || h.queue == nil {
		return
	}
	select {
	case h.queue <- claims:
	default:
		h.Log.Warn("webhook queue full; verdict change dropped", "instance", claims["sub"])
	}
}

func (h *Webhook) deliver(ctx context.Context, claims map[string]any) {
	tok, err := h.Signer.Sign(claims)
	if err != nil {
		h.Log.Error("signing a webhook", "err", err)
		return
	}
	body, _ := json.Marshal(api.VerdictToken{Token: tok})
	delay := h.Backoff
	for attempt := 1; attempt <= h.Attempts; attempt++ {
		err = h.post(ctx, body)
		if err == nil {
			return
		}
		h.Log.Warn("webhook delivery failed", "url", h.URL, "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay *= 2
	}
	h.Log.Error("webhook delivery given up", "url", h.URL, "instance", claims["sub"], "err", err)
}

func (h *Webhook) post(ctx context.Context, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.Client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}
