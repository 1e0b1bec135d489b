package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Webhook posts every verdict change to URL as {"token": <signed verdict>}:
// the body is the same ES256 JWT as GET …/attestation/token, so a receiver
// authenticates it with the verifier's JWKS. Deliveries wait in the store's
// outbox, written in the transaction of the change they announce, so a
// crash or restart loses none; a failed one is retried with backoff.
type Webhook struct {
	URL    string
	Signer *attest.Signer
	Store  *store.Store
	Log    *slog.Logger
	// Client defaults to one with a 10 s timeout. Whichever it is, Start
	// makes it refuse redirects (see noRedirects).
	Client *http.Client
	// Backoff is the first retry's delay, doubling each time; default 500 ms.
	Backoff time.Duration
	// Attempts bounds the tries per notification; default 10 (≈ 4 min).
	Attempts int

	kick chan struct{}
}

// Start delivers until ctx ends, beginning with what a previous run left.
func (h *Webhook) Start(ctx context.Context) {
	client := http.Client{Timeout: 10 * time.Second}
	if h.Client != nil {
		client = *h.Client
	}
	client.CheckRedirect = noRedirects
	h.Client = &client
	if h.Backoff == 0 {
		h.Backoff = 500 * time.Millisecond
	}
	if h.Attempts == 0 {
		h.Attempts = 10
	}
	if h.Log == nil {
		h.Log = slog.New(slog.DiscardHandler)
	}
	h.kick = make(chan struct{}, 1)
	go func() {
		for {
			wait := h.deliverDue(ctx)
			select {
			case <-ctx.Done():
				return
			case <-h.kick:
			case <-time.After(wait):
			}
		}
	}()
}

// enqueue adds a verdict change to the outbox within tx.
func (h *Webhook) enqueue(tx *store.Tx, claims map[string]any) error {
	if h == nil {
		return nil
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return err
	}
	return tx.Enqueue(payload)
}

// wake tells the deliverer that the outbox has news.
func (h *Webhook) wake() {
	if h == nil || h.kick == nil {
		return
	}
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// deliverDue sends the waiting deliveries in order, and returns how long
// until it should try again. Order matters to a receiver that acts on the
// latest verdict, so a failing delivery holds back those queued after it.
func (h *Webhook) deliverDue(ctx context.Context) time.Duration {
	for ctx.Err() == nil {
		var waiting []store.Delivery
		if err := h.Store.View(ctx, func(tx *store.Tx) (err error) { waiting, err = tx.Deliveries(64); return err }); err != nil {
			h.Log.Error("reading the webhook outbox", "err", err)
			return time.Second
		}
		if len(waiting) == 0 {
			return time.Minute
		}
		for _, d := range waiting {
			if wait := time.Until(d.NextAt); wait > 0 {
				return wait
			}
			err := h.deliver(ctx, d.Payload)
			if err != nil && ctx.Err() != nil {
				return 0 // shutting down: not an attempt
			}
			attempts := d.Attempts + 1
			switch {
			case err == nil:
			case attempts >= h.Attempts:
				h.Log.Error("webhook delivery given up", "url", h.URL, "attempts", attempts, "err", err)
			default:
				h.Log.Warn("webhook delivery failed", "url", h.URL, "attempt", attempts, "err", err)
			}
			retry := err != nil && attempts < h.Attempts
			uerr := h.Store.Update(ctx, func(tx *store.Tx) error {
				if retry {
					return tx.Retry(d.ID, time.Now().Add(h.Backoff<<(attempts-1)))
				}
				return tx.Delivered(d.ID)
			})
			if uerr != nil {
				h.Log.Error("updating the webhook outbox", "err", uerr)
				return time.Second
			}
			if retry {
				return h.Backoff << (attempts - 1)
			}
		}
	}
	return 0
}

// deliver signs the claims as of now (a delivery late after retries still
// carries a valid token; verified_at says when the verdict was reached)
// and posts them.
func (h *Webhook) deliver(ctx context.Context, payload []byte) error {
	var claims map[string]any
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	if err := dec.Decode(&claims); err != nil {
		return fmt.Errorf("decoding an outbox payload: %w", err)
	}
	now := time.Now()
	claims["iat"], claims["exp"] = now.Unix(), now.Add(tokenLifetime).Unix()
	tok, err := h.Signer.Sign(claims)
	if err != nil {
		return err
	}
	body, _ := json.Marshal(api.VerdictToken{Token: tok})
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
	if resp.StatusCode/100 == 3 {
		return fmt.Errorf("status %d redirecting to %q: %w", resp.StatusCode, resp.Header.Get("Location"), errRedirect)
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// errRedirect is a receiver's redirect, which a delivery never follows.
var errRedirect = errors.New("webhook redirects are not followed: the signed verdict goes only to the configured URL")

// noRedirects keeps a delivery at the configured URL. A redirect would hand
// the signed verdict to wherever the receiver (or whoever answers in its
// place) points; a 307 or 308 would re-post the body there. The redirect
// comes back as the response, and a failed delivery, retried as any other.
func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
