#!/usr/bin/env bash
# Brings up a real Keystone and a real Barbican from Debian 12's packages for
# the OpenStack tests and for developers, on a machine without systemd (as CI
# and these sandboxes are):
#
#   Keystone  http://127.0.0.1:5000/v3   uWSGI, SQLite, fernet tokens
#   Barbican  http://127.0.0.1:9311      uWSGI, SQLite, simple_crypto store,
#                                         Keystone tokens, the new policy
#                                         defaults (enforce_new_defaults,
#                                         enforce_scope)
#
# Each runs as ONE single-threaded uWSGI worker: SQLite takes one writer, and
# more threads or workers answer 500 "database is locked" under parallel
# writes. Keystone has the bootstrap roles only (admin, member, reader):
# creating a role on SQLite fails the same way.
#
# Identities (passwords random, made once, kept 0600 under the state):
#   admin           admin of project admin, and admin of the system
#   vtpmd           admin of project service: vtpmd's own service user
#   barbican        admin of project service: Barbican's token validation
#   vtpmd-a/-b      member of project vtpmd-a/-b
#   vtpmd-a-reader  reader of project vtpmd-a
# and $STATE/keystone/clouds.yaml (the openstack CLI's format) with clouds
# admin, admin-system, vtpmd, vtpmd-a, vtpmd-b and vtpmd-a-reader, and an
# openrc-<cloud> file for each next to it. The catalog lists Barbican as
# service key-manager.
#
#   openstack-up.sh                 up (installs what is missing); prints
#                                   keystone=URL barbican=URL clouds=FILE
#   openstack-up.sh status          the same line and rc 0 when healthy
#   openstack-up.sh stop            stops both
#   openstack-up.sh stop-barbican   stops Barbican only (tests of an outage)
#   openstack-up.sh start-barbican  brings up whatever is down again
#
# OPENSTACK_STATE (default /var/lib/vtpmd-openstack) holds everything, the
# databases and Barbican's master key included: `stop` then `rm -rf` of it is
# the reset. OPENSTACK_TOKEN_EXPIRATION (seconds, default 3600) is Keystone's
# token lifetime; a change restarts Keystone.
#
# Idempotent, and safe to run several at once (a lock in the state): a run
# while both are healthy changes nothing and returns in about half a second,
# the time Keystone takes to issue the token of the health check. Progress
# goes to stderr, the one-line summary to stdout. Processes are found, and
# stopped, by the pid files uWSGI writes, never by name. Passwords never go
# on a command line.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || exec sudo --preserve-env=OPENSTACK_STATE,OPENSTACK_TOKEN_EXPIRATION "$0" "$@"

state=${OPENSTACK_STATE:-/var/lib/vtpmd-openstack}
expiration=${OPENSTACK_TOKEN_EXPIRATION:-3600}
[[ $expiration =~ ^[1-9][0-9]*$ ]] || { echo "openstack-up: OPENSTACK_TOKEN_EXPIRATION=$expiration is not a number of seconds" >&2; exit 2; }
ks=$state/keystone bb=$state/barbican
ks_url=http://127.0.0.1:5000 bb_url=http://127.0.0.1:9311
ks_pid=$ks/uwsgi.pid bb_pid=$bb/uwsgi.pid

log() { echo "openstack-up: $*" >&2; }
summary() { echo "keystone=$ks_url/v3 barbican=$bb_url clouds=$ks/clouds.yaml"; }

# running PIDFILE: the pid in PIDFILE is a live uWSGI (a pid file left by a
# crash may name a pid reused since).
running() {
	local pid
	pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == uwsgi* ]]
}

# halt NAME PIDFILE: SIGTERM to the uWSGI master, and wait until it is gone.
halt() {
	running "$2" || return 0
	local pid
	pid=$(cat "$2")
	kill "$pid"
	for _ in $(seq 300); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
	if [ -d "/proc/$pid" ]; then
		log "$1 ($pid) did not stop in 30 s"
		exit 1
	fi
	rm -f "$2"
	log "stopped $1 ($pid)"
}

# token USER PROJECT: a project-scoped token for USER (password from its
# file, sent on stdin), on stdout.
token() {
	local pw
	pw=$(cat "$ks/passwords/$1")
	printf '{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "%s", "domain": {"id": "default"}, "password": "%s"}}}, "scope": {"project": {"name": "%s", "domain": {"id": "default"}}}}}' "$1" "$pw" "$2" |
		curl -sS -m 30 -o /dev/null -D - -H 'Content-Type: application/json' --data-binary @- "$ks_url/v3/auth/tokens" |
		tr -d '\r' | sed -n 's/^x-subject-token: //Ip'
}

# healthy: Keystone answers and issues the vtpmd user a token, and Barbican
# lists secrets with it (which proves its database and its token validation).
healthy() {
	running "$ks_pid" && running "$bb_pid" || return 1
	curl -fsS -m 10 -o /dev/null "$ks_url/v3" 2>/dev/null || return 1
	local tok
	tok=$(token vtpmd service 2>/dev/null) && [ -n "$tok" ] || return 1
	[ "$(printf 'X-Auth-Token: %s\n' "$tok" | curl -sS -m 30 -o /dev/null -w '%{http_code}' -H @- "$bb_url/v1/secrets?limit=1" 2>/dev/null)" = 200 ]
}

# replace FILE: stdin becomes FILE (0600) if it differs; rc 0 if it did.
replace() {
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	cat >"$tmp"
	if cmp -s "$tmp" "$1"; then
		rm -f "$tmp"
		return 1
	fi
	chmod 0600 "$tmp"
	mv "$tmp" "$1"
}

# password NAME: makes NAME's password once.
password() {
	[ -s "$ks/passwords/$1" ] && return
	(umask 077 && head -c 24 /dev/urandom | base64 | tr '+/' '-_' >"$ks/passwords/$1.tmp" && mv "$ks/passwords/$1.tmp" "$ks/passwords/$1")
}

# wait_http NAME PIDFILE URL: waits until URL answers 2xx/3xx, as long as the
# process lives.
wait_http() {
	for _ in $(seq 600); do
		curl -sS -m 5 -o /dev/null "$3" 2>/dev/null && return 0
		running "$2" || { log "$1 exited; see ${2%/*}/uwsgi.log"; exit 1; }
		sleep 0.1
	done
	log "$1 does not answer at $3; see ${2%/*}/uwsgi.log"
	exit 1
}

# uwsgi_start NAME DIR ARGS...: starts a one-worker, one-thread uWSGI in
# DIR. `Connection: close`, because uWSGI's --http-socket does not keep
# connections alive and clients that reuse one get "connection reset".
uwsgi_start() {
	local name=$1 dir=$2
	shift 2
	rm -f "$dir/uwsgi.pid"
	# 9>&-: the daemon must not inherit the lock.
	uwsgi --plugins python3 --master --processes 1 --threads 1 --lazy-apps --need-app --die-on-term \
		--buffer-size 65535 --add-header 'Connection: close' \
		--chdir "$dir" --pidfile "$dir/uwsgi.pid" --daemonize "$dir/uwsgi.log" "$@" 9>&-
	for _ in $(seq 100); do running "$dir/uwsgi.pid" && break; sleep 0.05; done
	log "started $name ($(cat "$dir/uwsgi.pid" 2>/dev/null))"
}

install_packages() {
	local packages=(keystone barbican-api uwsgi-core uwsgi-plugin-python3 curl) missing=()
	mapfile -t missing < <(dpkg-query -W -f='${Status} ${Package}\n' "${packages[@]}" 2>&1 |
		awk '!/^install ok installed /' | grep -oE '(keystone|barbican-api|uwsgi-core|uwsgi-plugin-python3|curl)$' || true)
	[ ${#missing[@]} -eq 0 ] && return
	log "installing ${missing[*]}"
	apt-get -o DPkg::Lock::Timeout=900 update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# On a host that runs systemd the packaged services start, on every
	# address; these tests run their own.
	if [ -d /run/systemd/system ]; then
		systemctl disable --now barbican-api keystone >/dev/null 2>&1 || true
	fi
}

keystone_up() {
	mkdir -p "$ks/passwords"
	chmod 0700 "$ks" "$ks/passwords"
	local user
	for user in admin vtpmd barbican vtpmd-a vtpmd-b vtpmd-a-reader; do password "$user"; done
	local changed=
	replace "$ks/keystone.conf" <<EOF && changed=yes
[DEFAULT]
log_file = $ks/keystone.log

[database]
connection = sqlite:///$ks/keystone.sqlite

[token]
provider = fernet
expiration = $expiration

[fernet_tokens]
key_repository = $ks/fernet-keys

[fernet_receipts]
key_repository = $ks/fernet-keys

[credential]
key_repository = $ks/credential-keys
EOF
	local manage=(keystone-manage --config-file "$ks/keystone.conf")
	if [ ! -e "$ks/bootstrapped" ]; then
		log "bootstrapping Keystone"
		mkdir -p "$ks/fernet-keys" "$ks/credential-keys"
		{
			"${manage[@]}" db_sync
			"${manage[@]}" fernet_setup --keystone-user root --keystone-group root
			"${manage[@]}" credential_setup --keystone-user root --keystone-group root
		} >>"$ks/manage.log" 2>&1
		chmod 0700 "$ks/fernet-keys" "$ks/credential-keys"
		# keystone-manage reads the password from OS_BOOTSTRAP_PASSWORD
		# when --bootstrap-password is not given: the environment of a
		# root process, not its command line.
		OS_BOOTSTRAP_PASSWORD=$(cat "$ks/passwords/admin") "${manage[@]}" bootstrap \
			--bootstrap-username admin --bootstrap-project-name admin \
			--bootstrap-role-name admin --bootstrap-region-id RegionOne \
			--bootstrap-admin-url "$ks_url/v3/" --bootstrap-internal-url "$ks_url/v3/" \
			--bootstrap-public-url "$ks_url/v3/" >>"$ks/manage.log" 2>&1
		touch "$ks/bootstrapped"
	fi
	if [ -n "$changed" ]; then halt Keystone "$ks_pid"; fi
	if ! running "$ks_pid"; then
		uwsgi_start Keystone "$ks" --http-socket 127.0.0.1:5000 \
			--wsgi-file /usr/bin/keystone-wsgi-public --env "OS_KEYSTONE_CONFIG_FILES=$ks/keystone.conf"
	fi
	wait_http Keystone "$ks_pid" "$ks_url/v3"
	# Identities, catalog, clouds.yaml: once, and again whenever a password
	# file is new.
	if [ ! -e "$ks/provisioned" ] || [ -n "$(find "$ks/passwords" -newer "$ks/provisioned" -type f)" ]; then
		log "creating identities and the catalog entry"
		/usr/bin/python3 - "$ks" "$ks_url/v3" "$bb_url" <<'EOF'
import json, os, shlex, sys, urllib.error, urllib.request

ks_dir, auth_url, barbican_url = sys.argv[1:4]


def password(user):
    with open(os.path.join(ks_dir, "passwords", user)) as f:
        return f.read().strip()


def call(method, path, body=None, token=None):
    req = urllib.request.Request(auth_url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
            return resp.headers, json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        sys.exit("openstack-up: %s %s: %d %s" % (method, path, e.code, e.read()[:500].decode(errors="replace")))


headers, _ = call("POST", "/auth/tokens", {"auth": {
    "identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"id": "default"}, "password": password("admin")}}},
    "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
token = headers["X-Subject-Token"]


def find(kind, **query):
    path = "/%s?%s" % (kind, "&".join("%s=%s" % kv for kv in query.items()))
    return call("GET", path, token=token)[1][kind]


def project(name):
    found = find("projects", name=name, domain_id="default")
    if found:
        return found[0]["id"]
    return call("POST", "/projects", {"project": {"name": name, "domain_id": "default"}}, token)[1]["project"]["id"]


def user(name, project_id):
    found = find("users", name=name, domain_id="default")
    if found:
        uid = found[0]["id"]
        call("PATCH", "/users/" + uid, {"user": {"password": password(name)}}, token)
        return uid
    return call("POST", "/users", {"user": {"name": name, "domain_id": "default", "default_project_id": project_id,
                                            "password": password(name)}}, token)[1]["user"]["id"]


roles = {r["name"]: r["id"] for r in find("roles")}
admin_id = find("users", name="admin", domain_id="default")[0]["id"]
call("PUT", "/system/users/%s/roles/%s" % (admin_id, roles["admin"]), token=token)
projects = {name: project(name) for name in ("admin", "service", "vtpmd-a", "vtpmd-b")}
for name, proj, role in (("vtpmd", "service", "admin"), ("barbican", "service", "admin"),
                         ("vtpmd-a", "vtpmd-a", "member"), ("vtpmd-b", "vtpmd-b", "member"),
                         ("vtpmd-a-reader", "vtpmd-a", "reader")):
    uid = user(name, projects[proj])
    call("PUT", "/projects/%s/users/%s/roles/%s" % (projects[proj], uid, roles[role]), token=token)

services = find("services", type="key-manager")
service_id = services[0]["id"] if services else call("POST", "/services", {"service": {
    "type": "key-manager", "name": "barbican", "description": "Key Manager", "enabled": True}}, token)[1]["service"]["id"]
endpoints = {e["interface"]: e for e in find("endpoints", service_id=service_id)}
for interface in ("public", "internal"):
    e = endpoints.get(interface)
    if e is None:
        call("POST", "/endpoints", {"endpoint": {"service_id": service_id, "interface": interface,
                                                 "url": barbican_url, "region_id": "RegionOne", "enabled": True}}, token)
    elif e["url"] != barbican_url:
        call("PATCH", "/endpoints/" + e["id"], {"endpoint": {"url": barbican_url}}, token)

clouds = (("admin", "admin", "admin"), ("admin-system", "admin", None), ("vtpmd", "vtpmd", "service"),
          ("vtpmd-a", "vtpmd-a", "vtpmd-a"), ("vtpmd-b", "vtpmd-b", "vtpmd-b"),
          ("vtpmd-a-reader", "vtpmd-a-reader", "vtpmd-a"))


def write(name, text):
    path = os.path.join(ks_dir, name)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


# Strings as JSON, which is YAML too: a password must stay a string.
q = json.dumps
yaml = ["clouds:"]
for cloud, name, proj in clouds:
    yaml += ["  %s:" % cloud, "    auth:", "      auth_url: %s" % q(auth_url),
             "      username: %s" % q(name), "      password: %s" % q(password(name))]
    yaml += ["      project_name: %s" % q(proj), "      project_domain_name: Default"] if proj else ["      system_scope: all"]
    yaml += ["      user_domain_name: Default", "    region_name: RegionOne", "    identity_api_version: 3"]
    env = [("OS_AUTH_URL", auth_url), ("OS_USERNAME", name), ("OS_PASSWORD", password(name)),
           ("OS_USER_DOMAIN_NAME", "Default"), ("OS_REGION_NAME", "RegionOne"), ("OS_IDENTITY_API_VERSION", "3")]
    if proj:
        env += [("OS_PROJECT_NAME", proj), ("OS_PROJECT_DOMAIN_NAME", "Default")]
        unset = "OS_SYSTEM_SCOPE"
    else:
        env += [("OS_SYSTEM_SCOPE", "all")]
        unset = "OS_PROJECT_NAME OS_PROJECT_ID OS_PROJECT_DOMAIN_NAME OS_PROJECT_DOMAIN_ID"
    write("openrc-" + cloud, "unset %s\n" % unset + "".join("export %s=%s\n" % (k, shlex.quote(v)) for k, v in env))
write("clouds.yaml", "\n".join(yaml) + "\n")
EOF
		touch "$ks/provisioned"
	fi
}

barbican_up() {
	mkdir -p "$bb/.barbican"
	chmod 0700 "$bb"
	# The master key (simple_crypto's KEK) wraps every project's key: made
	# once, lost only with the state.
	[ -s "$bb/kek" ] || (umask 077 && head -c 32 /dev/urandom | base64 -w0 >"$bb/kek.tmp" && mv "$bb/kek.tmp" "$bb/kek")
	local changed=
	# Barbican under uWSGI ignores --config-file: oslo.config takes the
	# first barbican.conf of ~/.barbican, ~, /etc/barbican and /etc, so it
	# runs with HOME=$bb.
	replace "$bb/.barbican/barbican.conf" <<EOF && changed=yes
[DEFAULT]
host_href = $bb_url
sql_connection = sqlite:///$bb/barbican.sqlite
db_auto_create = false
debug = false
log_file = $bb/barbican-api.log

[secretstore]
enabled_secretstore_plugins = store_crypto

[crypto]
enabled_crypto_plugins = simple_crypto

[simple_crypto_plugin]
kek = $(cat "$bb/kek")

[queue]
enable = false

[keystone_notifications]
enable = false

[oslo_policy]
policy_dirs = /etc/barbican/policy.d
enforce_new_defaults = True
enforce_scope = True

[keystone_authtoken]
www_authenticate_uri = $ks_url
auth_url = $ks_url
auth_type = password
user_domain_name = Default
project_domain_name = Default
project_name = service
username = barbican
password = $(cat "$ks/passwords/barbican")
EOF
	replace "$bb/barbican-api-paste.ini" <<'EOF' && changed=yes
[composite:main]
use = egg:Paste#urlmap
/: barbican_version
/healthcheck: healthcheck
/v1: barbican-api-keystone

[pipeline:barbican_version]
pipeline = cors http_proxy_to_wsgi microversion versionapp

[pipeline:barbican-api-keystone]
pipeline = cors http_proxy_to_wsgi authtoken context microversion apiapp

[app:apiapp]
paste.app_factory = barbican.api.app:create_main_app

[app:versionapp]
paste.app_factory = barbican.api.app:create_version_app

[app:healthcheck]
paste.app_factory = oslo_middleware:Healthcheck.app_factory
backends =

[filter:context]
paste.filter_factory = barbican.api.middleware.context:ContextMiddleware.factory

[filter:microversion]
paste.filter_factory = barbican.api.middleware.microversion:MicroversionMiddleware.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory

[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = barbican

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
EOF
	if [ ! -e "$bb/migrated" ]; then
		log "creating Barbican's database"
		(cd "$bb" && HOME=$bb barbican-manage db upgrade >>"$bb/manage.log" 2>&1)
		touch "$bb/migrated"
	fi
	if [ -n "$changed" ]; then halt Barbican "$bb_pid"; fi
	if ! running "$bb_pid"; then
		HOME=$bb uwsgi_start Barbican "$bb" --http-socket 127.0.0.1:9311 --paste "config:$bb/barbican-api-paste.ini"
	fi
	wait_http Barbican "$bb_pid" "$bb_url/healthcheck"
}

lock() {
	mkdir -p "$state"
	chmod 0700 "$state"
	exec 9>"$state/lock"
	flock 9
}

case ${1:-up} in
up | start-barbican)
	lock
	if grep -qx "expiration = $expiration" "$ks/keystone.conf" 2>/dev/null && healthy; then
		summary
		exit 0
	fi
	install_packages
	keystone_up
	barbican_up
	if ! healthy; then
		log "Keystone or Barbican is unhealthy; see $ks/keystone.log and $bb/barbican-api.log"
		exit 1
	fi
	summary
	;;
status)
	if ! healthy; then
		log "not healthy"
		exit 1
	fi
	summary
	;;
stop)
	lock
	halt Barbican "$bb_pid"
	halt Keystone "$ks_pid"
	;;
stop-barbican)
	lock
	halt Barbican "$bb_pid"
	;;
*)
	echo "usage: $0 [up|status|stop|stop-barbican|start-barbican]" >&2
	exit 2
	;;
esac
