"""
Configuration: defaults, precedence, validation and the twistd options.
"""

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import ConfigError, load_settings, parse_redis_url
from wsproxy.process.tap import Options


class DefaultsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        With nothing configured, every setting has the documented default.
        """
        s = load_settings(environ={}, dotenv_path=None)
        self.assertEqual(
            (s.host, s.port, s.listen, s.auth_timeout, s.auth_grace_period,
             s.ping_interval, s.ping_timeout, s.shutdown_grace_period,
             s.max_message_size, s.log_level, s.log_format, s.require_json,
             s.frame_mode, s.compression, s.max_connections, s.allowed_origins),
            ("0.0.0.0", 8080, "", 5.0, 10800, 30.0, 10.0, 30.0, 1048576, "info",
             "text", False, "auto", False, 0, ()),
        )
        self.assertEqual(s.redis.host, "127.0.0.1")
        self.assertEqual(s.redis.port, 6379)
        self.assertEqual(s.endpoint, "tcp:8080:interface=0.0.0.0:backlog=4096")

    def test_listen_overrides_host_and_port(self) -> None:
        """
        LISTEN, when set, is the endpoint; HOST and PORT are ignored.
        """
        s = load_settings(environ={"LISTEN": "tcp:9000", "PORT": "1"}, dotenv_path=None)
        self.assertEqual(s.endpoint, "tcp:9000")


class PrecedenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        fd, self.dotenv = tempfile.mkstemp()
        with os.fdopen(fd, "w") as f:
            f.write("PORT=7001\nLOG_LEVEL=debug\nAUTH_TIMEOUT_SECS=7\n")
        self.addCleanup(os.remove, self.dotenv)

    def test_dotenv_environment_options(self) -> None:
        """
        .env sets values, the environment wins over .env, options win over both.
        """
        s = load_settings(
            overrides={"AUTH_TIMEOUT_SECS": "9", "PORT": None},
            environ={"LOG_LEVEL": "warn", "AUTH_TIMEOUT_SECS": "8"},
            dotenv_path=self.dotenv,
        )
        self.assertEqual((s.port, s.log_level, s.auth_timeout), (7001, "warn", 9.0))

    def test_options_become_overrides(self) -> None:
        """
        Command-line options reach the settings under their variable's name.
        """
        options = Options()
        old = os.environ.get("PORT")
        os.environ["PORT"] = "1234"
        try:
            options.parseOptions(["--port", "4321", "--redis-url", "redis://h:1/2"])
        finally:
            if old is None:
                del os.environ["PORT"]
            else:
                os.environ["PORT"] = old
        self.assertEqual(options.settings.port, 4321)
        self.assertEqual((options.settings.redis.host, options.settings.redis.db), ("h", 2))


class ValidationTests(SynchronousTestCase):
    def assertRejected(self, name: str, value: str) -> str:
        e = self.assertRaises(
            ConfigError, load_settings, environ={name: value}, dotenv_path=None
        )
        message = str(e)
        self.assertTrue(message.startswith(name + ":"), message)
        return message

    def test_invalid_values_name_the_variable(self) -> None:
        """
        Each invalid value is refused with a message that starts with the
        variable's name.
        """
        for name, value in [
            ("PORT", "http"), ("PORT", "70000"), ("AUTH_TIMEOUT_SECS", "-1"),
            ("AUTH_TIMEOUT_SECS", "0"), ("WS_PING_INTERVAL_SECS", "-5"),
            ("SHUTDOWN_GRACE_PERIOD_SECS", "soon"), ("MAX_MESSAGE_SIZE_BYTES", "0"),
            ("LOG_LEVEL", "loud"), ("LOG_FORMAT", "xml"), ("REDIS_URL", "http://x"),
            ("REDIS_URL", "redis://"), ("REDIS_URL", "redis://h:port"),
            ("REQUIRE_JSON", "maybe"), ("FRAME_MODE", "binary"),
            ("ALLOWED_ORIGINS", "example.com"), ("MAX_CONNECTIONS", "-1"),
            ("AUTH_GRACE_PERIOD_SECS", "1.5"), ("HOST", "127.0.0.1:8080"),
            ("HOST", "bad host"), ("LISTEN", "bogus:1"), ("LISTEN", "tcp:http"),
            ("LISTEN", "ssl:0:privateKey=/nonexistent/key.pem"),
        ]:
            self.assertRejected(name, value)

    def test_valid_hosts_and_endpoints(self) -> None:
        """
        HOST takes IPv4 and IPv6 addresses and host names; LISTEN takes any
        Twisted server endpoint string, checked without listening.
        """
        for host in ("0.0.0.0", "::", "::1", "localhost", "proxy-1.example.com", ""):
            self.assertEqual(load_settings(environ={"HOST": host}, dotenv_path=None).host, host)
        for listen in ("tcp:0", "tcp6:8080:interface=\\:\\:1", "unix:/run/wsproxy.sock"):
            self.assertEqual(
                load_settings(environ={"LISTEN": listen}, dotenv_path=None).listen, listen
            )

    def test_redis_tls_files(self) -> None:
        """
        REDIS_TLS_CA_FILE, REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE must
        name readable files, need a rediss:// REDIS_URL, and the key needs
        the certificate; each refusal names the variable.
        """
        fd, pem = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.remove, pem)
        tls = {"REDIS_URL": "rediss://h"}
        for name in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
            for environ in ({**tls, name: "/nonexistent.pem"}, {**tls, name: "/"},
                            {name: pem}):
                e = self.assertRaises(ConfigError, load_settings, environ=environ,
                                      dotenv_path=None)
                self.assertTrue(str(e).startswith(name + ":"), (environ, str(e)))
        self.assertRaises(ConfigError, load_settings, dotenv_path=None,
                          environ={**tls, "REDIS_TLS_KEY_FILE": pem})
        s = load_settings(environ={**tls, "REDIS_TLS_CA_FILE": pem, "REDIS_TLS_CERT_FILE": pem,
                                   "REDIS_TLS_KEY_FILE": pem}, dotenv_path=None)
        self.assertEqual((s.redis_tls_ca_file, s.redis_tls_cert_file, s.redis_tls_key_file),
                         (pem, pem, pem))

    def test_workers_need_host_port(self) -> None:
        """
        WORKERS > 1 shares a plain TCP socket: combining it with LISTEN is
        refused, naming WORKERS.
        """
        e = self.assertRaises(
            ConfigError, load_settings, environ={"WORKERS": "2", "LISTEN": "tcp:1"},
            dotenv_path=None,
        )
        self.assertTrue(str(e).startswith("WORKERS:"))
        self.assertRejected("WORKERS", "0")

    def test_redis_password_not_echoed(self) -> None:
        """
        A malformed REDIS_URL is reported without repeating it (it may hold
        a password).
        """
        message = self.assertRejected("REDIS_URL", "redis://user:hunter2@h:notaport")
        self.assertNotIn("hunter2", message)

    def test_options_error_is_one_line_and_exit_2(self) -> None:
        """
        An invalid option stops with exit status 2 (not twistd's whole usage
        text).
        """
        e = self.assertRaises(SystemExit, Options().parseOptions, ["--port", "eighty"])
        self.assertEqual(e.code, 2)


class RedisUrlTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        redis://, rediss:// and unix:// URLs, with credentials and database.
        """
        a = parse_redis_url("redis://user:p%40ss@redis.example:6380/3")
        self.assertEqual(
            (a.host, a.port, a.username, a.password, a.db, a.tls),
            ("redis.example", 6380, "user", "p@ss", 3, False),
        )
        b = parse_redis_url("rediss://:secret@h")
        self.assertEqual((b.port, b.username, b.password, b.tls), (6379, None, "secret", True))
        c = parse_redis_url("unix:///run/redis.sock?db=2")
        self.assertEqual((c.path, c.db), ("/run/redis.sock", 2))
        e = parse_redis_url("redis://secret@h:6380")
        self.assertEqual((e.username, e.password, e.port), (None, "secret", 6380))
        d = parse_redis_url("redis://[::1]:7000")
        self.assertEqual((d.host, d.port), ("::1", 7000))

    def test_describe_hides_password(self) -> None:
        """
        The printable form of an address has no credentials.
        """
        text = parse_redis_url("redis://u:topsecret@h:1/4").describe()
        self.assertEqual(text, "redis://h:1/4")


class ExampleFileTests(SynchronousTestCase):
    def test_env_example_lists_every_setting(self) -> None:
        """
        .env.example names every variable, and loading it as a .env gives
        the defaults.
        """
        from wsproxy.config import SETTINGS

        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".env.example")
        with open(path) as f:
            text = f.read()
        for setting in SETTINGS:
            self.assertIn(f"{setting.env}=", text)
        self.assertEqual(
            load_settings(environ={}, dotenv_path=path),
            load_settings(environ={}, dotenv_path=None),
        )
