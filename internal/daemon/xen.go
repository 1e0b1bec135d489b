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
func (d *AllInOne) startXen() (*xen.Backend, error) {
	cfg := d.cfg.Xen
	group, err := xen.OpenGroup(filepath.Join(d.cfg.DataDir, "xen"), cfg.Group, cfg.GroupCapacity)
	if err != nil {
		return nil, err
	}
	b, err := xen.New(cfg.Layout(), group, d.log)
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
	d.xenUUID = &http.Server{Handler: xen.UUIDServer(group, d.log), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := d.xenUUID.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("Xen UUID service stopped", "err", err)
		}
	}()
	d.XenUUIDAddr = ln.Addr().String()
	d.log.Info("Xen UUID service listening", "addr", d.XenUUIDAddr, "group", cfg.Group)
	return b, nil
}
