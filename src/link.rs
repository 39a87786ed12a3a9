//! Links over rtnetlink: bridge, ports, addresses, policy routing (placeholder until it lands).
