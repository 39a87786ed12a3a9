//! netlink back end (nftnl + mnl): placeholder until it lands.
