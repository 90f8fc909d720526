//! Client authentication, answered as Redis 7 answers with `requirepass` and ACL users.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code asserts by panicking

mod support;

use redis::AsyncCommands;
use redmux::config::{Secret, UserConfig};
use support::{RedisServer, Redmux};

fn config(redis: &RedisServer) -> redmux::Config {
    let mut config = support::config(&redis.addr());
    config.auth.password = Some(Secret::new("s3cret"));
    config.auth.users = vec![UserConfig {
        name: "app".into(),
        password: Some(Secret::new("apppw")),
        ..UserConfig::default()
    }];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_must_authenticate_first() {
    let redis = RedisServer::start();
    let redmux = Redmux::start_with(config(&redis)).await;
    let mut raw = redmux.raw().await;
    assert_eq!(
        raw.call(&["GET", "k"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        raw.call(&["SELECT", "1"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        raw.call(&["MULTI"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        raw.call(&["HELLO", "3"]).await,
        "-NOAUTH HELLO must be called with the client already authenticated, otherwise the \
         HELLO AUTH <user> <pass> option can be used to authenticate the client and select the \
         RESP protocol version at the same time\r\n"
    );
    assert_eq!(
        raw.call(&["AUTH", "wrong"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        raw.call(&["AUTH", "nobody", "s3cret"]).await,
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    // Pipelined: AUTH, then commands that run because it succeeded.
    raw.send("AUTH s3cret\r\nSET k v\r\nGET k\r\n").await;
    assert_eq!(raw.reply_str().await, "+OK\r\n");
    assert_eq!(raw.reply_str().await, "+OK\r\n");
    assert_eq!(raw.reply_str().await, "$1\r\nv\r\n");
    // RESET logs out again.
    assert_eq!(raw.call(&["RESET"]).await, "+RESET\r\n");
    assert_eq!(
        raw.call(&["GET", "k"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(raw.call(&["AUTH", "app", "apppw"]).await, "+OK\r\n");
    let info = raw.call(&["CLIENT", "INFO"]).await;
    assert!(info.contains(" user=app "), "{info}");
    // HELLO 3 AUTH user pass logs in and switches protocol at once.
    let mut v3 = redmux.raw().await;
    let hello = v3.call(&["HELLO", "3", "AUTH", "default", "s3cret"]).await;
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    assert_eq!(v3.call(&["GET", "missing"]).await, "_\r\n");
    // QUIT works unauthenticated.
    let mut quitter = redmux.raw().await;
    assert_eq!(quitter.call(&["QUIT"]).await, "+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_clients_get_redis_tighter_limits() {
    let redis = RedisServer::start();
    let redmux = Redmux::start_with(config(&redis)).await;
    let mut raw = redmux.raw().await;
    raw.send("*11\r\n").await;
    assert_eq!(
        raw.reply_str().await,
        "-ERR Protocol error: unauthenticated multibulk length\r\n"
    );
    raw.expect_closed().await;
    let mut raw = redmux.raw().await;
    raw.send("*2\r\n$3\r\nGET\r\n$16385\r\n").await;
    assert_eq!(
        raw.reply_str().await,
        "-ERR Protocol error: unauthenticated bulk length\r\n"
    );
    raw.expect_closed().await;
    // The same request after AUTH is fine.
    let mut raw = redmux.raw().await;
    assert_eq!(raw.call(&["AUTH", "s3cret"]).await, "+OK\r\n");
    let big = "b".repeat(20_000);
    assert_eq!(raw.call(&["SET", "big", &big]).await, "+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_with_a_password_in_the_url() {
    let redis = RedisServer::start();
    let redmux = Redmux::start_with(config(&redis)).await;
    let mut con = redis::Client::open(format!("redis://app:apppw@{}/", redmux.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = con.set("from-crate", "yes").await.unwrap();
    let got: String = con.get("from-crate").await.unwrap();
    assert_eq!(got, "yes");
    let bad = redis::Client::open(format!("redis://app:nope@{}/", redmux.addr))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    assert!(bad.is_err());
}

#[test]
fn passwords_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = support::write_file(dir.path(), "pw", "from-file\n");
    let file = support::write_file(
        dir.path(),
        "redmux.toml",
        &format!(
            "[auth]\npassword_env = \"REDMUX_TEST_AUTH_PW\"\n[[auth.users]]\nname = \"svc\"\npassword_file = \"{}\"\n",
            secret_file.display()
        ),
    );
    std::env::set_var("REDMUX_TEST_AUTH_PW", "from-env");
    let config = redmux::Config::load(Some(&file), &Default::default()).unwrap();
    let users = redmux::auth::Users::new(&config.auth);
    assert_eq!(users.check(None, b"from-env"), Ok("default".into()));
    assert_eq!(users.check(Some(b"svc"), b"from-file"), Ok("svc".into()));
    let missing = support::write_file(
        dir.path(),
        "bad.toml",
        "[auth]\npassword_env = \"REDMUX_TEST_UNSET_VAR\"\n",
    );
    let err = redmux::Config::load(Some(&missing), &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("auth.password") && err.contains("REDMUX_TEST_UNSET_VAR"),
        "{err}"
    );
}
