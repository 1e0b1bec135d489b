package daemon

import (
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/vtpmd/vtpmd/internal/backend/xen"
)

// startXen opens the VTPM manager group's books under the data dir and
// makes the Xen backend; with UUIDListen it also serves the UUID service.
func (h *HostAgent) startXen() (*xen.Backend, error) {
	cfg := h.cfg.Xen
	group, err := xen.OpenGroup(filepath.Join(h.cfg.DataDir, "xen"), cfg.Group, cfg.GroupCapacity)
	if err != nil {
		return nil, err
	}
	b, err := xen.New(cfg.Layout(), group, h.log)
	if err != nil {
		return nil, err
	}
	if cfg.UUIDListen == "" {
		return b, nil
	}
	ln, err := net.Listen("tcp", cfg.UUIDListen)
	if err != nil {
		return nil, err
	}
	h.xenUUID = &http.Server{Handler: xen.UUIDServer(group, h.log), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := h.xenUUID.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			h.log.Error("Xen UUID service stopped", "err", err)
		}
	}()
	h.XenUUIDAddr = ln.Addr().String()
	h.log.Info("Xen UUID service listening", "addr", h.XenUUIDAddr, "group", cfg.Group)
	return b, nil
}
