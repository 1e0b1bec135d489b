package console

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"mime"
	"net/http"
	"path"
	"strconv"
	"strings"
)

// The console's script and stylesheet, embedded and served under names
// that carry a hash of their content (console.3f2a….js), so that a
// browser may keep each for good and a new build's are new names.

//go:embed assets
var assetFiles embed.FS

// asset is one embedded file as served.
type asset struct {
	body        []byte
	contentType string
}

var (
	assetURLs = map[string]string{} // file name → its URL
	assets    = map[string]asset{}  // hashed name → the file
)

func init() {
	entries, err := assetFiles.ReadDir("assets")
	if err != nil {
		panic(err)
	}
	for _, e := range entries {
		body, err := assetFiles.ReadFile("assets/" + e.Name())
		if err != nil {
			panic(err)
		}
		sum := sha256.Sum256(body)
		ext := path.Ext(e.Name())
		hashed := strings.TrimSuffix(e.Name(), ext) + "." + hex.EncodeToString(sum[:6]) + ext
		assetURLs[e.Name()] = "/ui/assets/" + hashed
		assets[hashed] = asset{body: body, contentType: mime.TypeByExtension(ext)}
	}
}

// assetURL is the URL of the embedded file name; the template function
// "asset".
func assetURL(name string) string {
	u, ok := assetURLs[name]
	if !ok {
		panic("console: no asset " + name)
	}
	return u
}

// serveAsset serves an embedded file by its hashed name, cached for good.
func serveAsset(w http.ResponseWriter, r *http.Request) {
	a, ok := assets[r.PathValue("name")]
	if !ok {
		http.NotFound(w, r)
		return
	}
	h := w.Header()
	h.Set("Content-Type", a.contentType)
	h.Set("Cache-Control", "public, max-age=31536000, immutable")
	h.Set("Content-Length", strconv.Itoa(len(a.body)))
	w.Write(a.body)
}
