"""Drives the PyPI mqtt-sn-12 client through the Will handshake and both Will updates, then
vanishes without DISCONNECT so the gateway loses it and publishes the (updated) Will.

usage: sn_will.py PORT CLIENT_ID KEEPALIVE WILL_TOPIC WILL_MSG NEW_TOPIC NEW_MSG
Prints CONNECTED and UPDATED as it goes; exits non-zero on any protocol error."""

import sys

from mqttsn12.client.MqttSnClient import MqttSnClient

port, client_id, keepalive, topic, msg, new_topic, new_msg = sys.argv[1:8]
c = MqttSnClient()
c.set_client_id(client_id)
c.set_keep_alive(int(keepalive))
c.set_will_topic(topic)
c.set_will_message(msg)
c.set_will_qos(1)
c.open("127.0.0.1", int(port))
c.send_connect()
print("CONNECTED", flush=True)
c.send_will_topic_update(new_topic)
c.send_will_message_update(new_msg)
print("UPDATED", flush=True)
c.close()
