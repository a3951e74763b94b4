//! mTLS between services: with a certificate, key and CA configured, a service's gRPC port only
//! talks to clients presenting a certificate signed by the CA; the plaintext health port still
//! answers probes. Certificates are generated here (rcgen): a CA, a server certificate for
//! localhost/127.0.0.1, a client certificate, and a client certificate from an unrelated CA.

use std::time::Duration;

use chipgate_proto::licensing::v1 as lpb;
use chipgate_proto::licensing::v1::licensing_service_client::LicensingServiceClient;
use chipgate_runtime::Shutdown;
use chipgate_runtime::auth::TokenSource;
use chipgate_runtime::server::{ServerConfig, TlsConfig};
use chipgate_state::Store;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// `(certificate PEM, key PEM)` for `names`, signed by `ca`.
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn client_tls(ca: &Ca, identity: Option<&(String, String)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

async fn list_queue(url: &str, tls: ClientTlsConfig) -> Result<(), String> {
    let channel = Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    LicensingServiceClient::new(channel)
        .list_queue(lpb::ListQueueRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("call: {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_cluster_certificate_and_probes_use_the_plain_health_port() {
    chipgate_runtime::telemetry::init_for_tests();
    let cluster_ca = ca("chipgate test CA");
    let (server_cert, server_key) = leaf(&cluster_ca, &["localhost", "127.0.0.1"]);
    let client = leaf(&cluster_ca, &["orders.chipgate.svc"]);
    let stranger_ca = ca("someone else");
    let stranger = leaf(&stranger_ca, &["mallory"]);

    let tls = TlsConfig {
        cert_pem: server_cert.into_bytes(),
        key_pem: server_key.into_bytes(),
        ca_pem: cluster_ca.pem.clone().into_bytes(),
    };
    let config = ServerConfig {
        tls: Some(tls),
        health_listen: Some("127.0.0.1:0".parse().unwrap()),
        health_interval: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let store = Store::memory();
    let lic = chipgate_licensing::Licensing::new(store.clone());
    let server =
        chipgate_testkit::start_service(store, config, Shutdown::new(), |c| chipgate_licensing::spec(lic, c)).await;
    let url = format!("https://127.0.0.1:{}", server.addr.port());

    // With a certificate from the cluster CA: served.
    list_queue(&url, client_tls(&cluster_ca, Some(&client))).await.expect("a client with a cluster certificate");
    // Without a certificate, or with one from another CA: refused during the handshake.
    let none = list_queue(&url, client_tls(&cluster_ca, None)).await;
    assert!(none.is_err(), "a client without a certificate must be refused");
    let other = list_queue(&url, client_tls(&cluster_ca, Some(&stranger))).await;
    assert!(other.is_err(), "a certificate from another CA must be refused");
    // Plaintext on the TLS port: refused.
    let plain = chipgate_testkit::channel(&format!("http://127.0.0.1:{}", server.addr.port()));
    assert!(LicensingServiceClient::new(plain).list_queue(lpb::ListQueueRequest::default()).await.is_err());

    // The plaintext health port answers probes, and only health.
    let health_addr = server.running.health_addr.expect("a health port");
    let health_url = format!("http://{health_addr}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(chipgate_testkit::channel(&health_url));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: chipgate_licensing::SERVICE_NAME.into() })
            .await;
        if r.is_ok_and(|r| r.into_inner().status == 1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "health port never said SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let business = LicensingServiceClient::new(chipgate_testkit::channel(&health_url))
        .list_queue(lpb::ListQueueRequest::default())
        .await;
    assert_eq!(business.unwrap_err().code(), tonic::Code::Unimplemented, "the health port serves nothing else");

    // Orders' peer clients speak mTLS with the same material.
    let orders_tls = TlsConfig {
        cert_pem: client.0.clone().into_bytes(),
        key_pem: client.1.clone().into_bytes(),
        ca_pem: cluster_ca.pem.clone().into_bytes(),
    };
    let peers = chipgate_orders::Peers::connect(&url, &url, 1 << 20, TokenSource::None, Some(&orders_tls)).unwrap();
    peers.licensing.clone().list_queue(lpb::ListQueueRequest::default()).await.expect("orders' client over mTLS");
}
